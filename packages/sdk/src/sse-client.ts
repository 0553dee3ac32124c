/** Reads a Server-Sent Events response as an async iterator of parsed JSON events. */
import { createParser, type EventSourceMessage } from 'eventsource-parser';

export interface SseEvent<T = unknown> {
  event: string;
  id?: string;
  data: T;
}

export async function* readSse<T>(res: Response, signal?: AbortSignal): AsyncGenerator<SseEvent<T>> {
  if (!res.body) return;
  const queue: EventSourceMessage[] = [];
  const parser = createParser({ onEvent: (m) => queue.push(m) });
  const decoder = new TextDecoder();
  const reader = res.body.getReader();
  const onAbort = () => void reader.cancel().catch(() => undefined);
  signal?.addEventListener('abort', onAbort);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      parser.feed(decoder.decode(value, { stream: true }));
      while (queue.length) {
        const m = queue.shift()!;
        yield { event: m.event ?? 'message', id: m.id, data: JSON.parse(m.data) as T };
      }
    }
  } catch (e) {
    if (signal?.aborted) return;
    throw e;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}
