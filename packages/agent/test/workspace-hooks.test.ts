/**
 * Lifecycle hooks run in a real sandbox box, and a private checkout placed into a box's workspace
 * from the host without the credential reaching anything the box can read.
 */
import { execFileSync } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import type { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { HookFailedError, runHook, type HookOutputLine } from '@devyard/agent/workspace/lifecycle-hooks';
import { checkoutRepository } from '@devyard/agent/workspace/repository-checkout';
import { boxLeftovers, run, testDriver } from './sandbox-test-host.js';
import { GitFixture } from './workspace-git-fixture.js';

describe('lifecycle hooks and checkout in a box', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let image: BuiltImage;
  let fx: GitFixture;
  const boxId = 'h_box';
  let spec: BoxRuntimeSpec;

  beforeAll(async () => {
    ({ driver, dataDir } = await testDriver('hook', 235));
    await driver.init();
    image = await new BuiltinImageStore({ dataDir }).ensure('tiny');
    fx = await GitFixture.start();
    spec = {
      boxId,
      name: 'h-box',
      imageRootfs: image.rootfs,
      imageDigest: image.digest,
      resources: { cpuMillis: 1000, memoryBytes: 128 * 1024 * 1024, pids: 128 },
      env: { TEMPLATE_VAR: 'tv' },
    };
    await driver.create(spec);
    // The checkout lands in the stopped box's workspace volume, before its first start.
    const paths = driver.boxHostPaths(boxId);
    await checkoutRepository({ url: `${fx.httpUrl}/secret-app.git`, credentials: fx.credentials, workspaceDir: paths.workspace, owner: paths.owner });
    await driver.start(spec);
  });

  afterAll(async () => {
    await driver.destroy(boxId);
    expect(boxLeftovers(driver, dataDir, boxId)).toEqual([]);
    await driver.teardownHost();
    await rm(dataDir, { recursive: true, force: true });
    await fx.close();
  });

  test('the box sees the private checkout, owned by its root; the credential is in none of its files', async () => {
    const r = await run(driver, boxId, ['sh', '-c', 'cat /workspace/secret-app/README; stat -c %u:%g /workspace/secret-app/README; echo $TEMPLATE_VAR']);
    expect(r.out).toBe('v2\n0:0\ntv\n');
    // Everything of the box on the host: disk state, volumes, box.json, config.json.
    const { dir } = driver.boxHostPaths(boxId);
    const b64 = Buffer.from(`${fx.credentials.username}:${fx.credentials.password}`).toString('base64');
    for (const needle of [fx.credentials.password, b64]) {
      let hits = '';
      try {
        hits = execFileSync('grep', ['-rl', '--', needle, dir], { encoding: 'utf8' });
      } catch (e) {
        if ((e as { status?: number }).status !== 1) throw e;
      }
      expect(hits).toBe('');
    }
    // And none of the box's processes has it in its environment.
    const env = await run(driver, boxId, ['sh', '-c', 'cat /proc/*/environ 2>/dev/null | tr "\\0" "\\n"']);
    expect(env.out).not.toContain(fx.credentials.password);
    expect(env.out).toContain('TEMPLATE_VAR=tv');
  });

  test('string form: /bin/sh -c, env, cwd in the repository, lines streamed in order', async () => {
    const lines: HookOutputLine[] = [];
    const r = await runHook(driver, boxId, {
      name: 'onCreate',
      command: 'pwd; echo "$GREETING"; echo to-stderr >&2; printf "no-newline"',
      env: { GREETING: 'hello' },
      repoName: 'secret-app',
      onLine: (l) => lines.push(l),
    });
    expect(lines.filter((l) => l.stream === 'stdout').map((l) => l.line)).toEqual(['/workspace/secret-app', 'hello', 'no-newline']);
    expect(lines.find((l) => l.stream === 'stderr')).toEqual({ hook: 'onCreate', command: undefined, stream: 'stderr', line: 'to-stderr' });
    expect(r.output).toContain('/workspace/secret-app\n');
    const noRepo = await runHook(driver, boxId, { name: 'postStart', command: 'pwd' });
    expect(noRepo.output).toBe('/workspace\n');
  });

  test('array form is exec form: no shell expansion', async () => {
    const r = await runHook(driver, boxId, { name: 'updateContent', command: ['echo', '$HOME', '*'], cwd: '/tmp' });
    expect(r.output).toBe('$HOME *\n');
  });

  test('object form runs its commands in parallel', async () => {
    // Each waits for the other's marker: run one after the other, they would time out.
    const r = await runHook(driver, boxId, {
      name: 'onCreate',
      command: {
        a: 'touch /tmp/a; for i in $(seq 100); do [ -e /tmp/b ] && break; sleep 0.05; done; [ -e /tmp/b ] && echo a-saw-b',
        b: ['sh', '-c', 'touch /tmp/b; for i in $(seq 100); do [ -e /tmp/a ] && break; sleep 0.05; done; [ -e /tmp/a ] && echo b-saw-a'],
      },
      timeoutMs: 8000,
    });
    expect(r.output.split('\n').filter(Boolean).sort()).toEqual(['[a] a-saw-b', '[b] b-saw-a']);
    await run(driver, boxId, ['rm', '-f', '/tmp/a', '/tmp/b']);
  });

  test('a failing hook throws HookFailedError with its name, exit code and the last 20 lines', async () => {
    const err = await runHook(driver, boxId, { name: 'onCreate', command: 'for i in $(seq 1 50); do echo line $i; done; echo oops >&2; exit 3' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HookFailedError);
    const h = err as HookFailedError;
    expect([h.hookName, h.exitCode, h.commandName]).toEqual(['onCreate', 3, undefined]);
    expect(h.logTail).toHaveLength(20);
    expect(h.logTail.at(-1)).toBe('oops');
    expect(h.logTail[0]).toBe('line 32');
    expect(h.message).toMatch(/^onCreate exited 3:\n/);
    const par = await runHook(driver, boxId, { name: 'updateContent', command: { ok: 'true', bad: 'echo broken; exit 9' } }).catch((e: unknown) => e);
    expect((par as HookFailedError).commandName).toBe('bad');
    expect((par as HookFailedError).exitCode).toBe(9);
    expect((par as HookFailedError).logTail).toEqual(['broken']);
    const missing = await runHook(driver, boxId, { name: 'onCreate', command: ['/no/such/program'] }).catch((e: unknown) => e);
    expect((missing as HookFailedError).exitCode).not.toBe(0);
  });

  test('output is bounded to its tail; a hook past its timeout is killed', async () => {
    const r = await runHook(driver, boxId, { name: 'onCreate', command: 'seq 1 20000', maxOutputBytes: 1000 });
    expect(r.output.length).toBeLessThanOrEqual(1000);
    expect(r.output.endsWith('19999\n20000\n')).toBe(true);
    const t0 = performance.now();
    const slow = await runHook(driver, boxId, { name: 'onCreate', command: 'echo started; sleep 30', timeoutMs: 500 }).catch((e: unknown) => e);
    expect(performance.now() - t0).toBeLessThan(5000);
    expect((slow as HookFailedError).timedOut).toBe(true);
    expect((slow as HookFailedError).logTail).toEqual(['started']);
  });
});
