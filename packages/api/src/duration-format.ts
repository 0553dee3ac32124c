/** Durations as people write them in templates ("30m", "8h", "1h30m", "2d"), kept as text in the API. */

const UNIT_MS: Record<string, number> = { d: 86_400_000, h: 3_600_000, m: 60_000, s: 1000 };

/** Units in descending order, each at most once: "1h30m" reads one way only, "30m1h" is a typo. */
export const DURATION_PATTERN = /^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/;

/** Milliseconds of a duration, or undefined when the text is not one (empty, zero, unknown unit). */
export function parseDuration(text: string): number | undefined {
  const m = DURATION_PATTERN.exec(text);
  if (!m || text === '') return undefined;
  const ms = (['d', 'h', 'm', 's'] as const).reduce((sum, unit, i) => sum + Number(m[i + 1] ?? 0) * UNIT_MS[unit]!, 0);
  return ms > 0 && Number.isSafeInteger(ms) ? ms : undefined;
}
