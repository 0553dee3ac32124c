/**
 * End to end, the way a user works: `devyard up` in a temp dir, then the CLI through the whole
 * lifecycle of real sandbox boxes (crun, namespaces, cgroups), including killing the whole
 * all-in-one process and restarting it (boxes keep running and are adopted).
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cleanup, cli, cliOk, daemonOutput, kill9, newHarness, startUp, type Harness } from './devyard-harness.js';

let h: Harness;

beforeAll(async () => {
  h = newHarness('e2e', 215);
  await startUp(h);
});

afterAll(async () => {
  if (h) await cleanup(h);
});

const json = <T = Record<string, unknown>>(args: string[]) => JSON.parse(cliOk(h, [...args, '--json'])) as T;

function counter(): number {
  return Number(cliOk(h, ['exec', 'demo', '--', 'cat', '/tmp/counter']).trim());
}

describe('devyard CLI against devyard up', () => {
  it('prints how to reach the platform and configures the CLI', () => {
    expect(daemonOutput(h)).toContain('Devyard is up.');
    expect(daemonOutput(h)).toContain('devyard create demo --template base --wait');
    expect(JSON.parse(readFileSync(join(h.dir, 'config.json'), 'utf8'))).toMatchObject({ url: h.url, token: expect.stringMatching(/^dy_u_/) });
    const nodes = json<Array<{ status: string; runtimes: string[] }>>(['nodes']);
    expect(nodes).toHaveLength(1);
    expect(nodes[0]).toMatchObject({ status: 'ready', runtimes: ['sandbox'] });
    expect(json<Array<{ name: string }>>(['templates']).map((t) => t.name)).toEqual(['base', 'tiny']);
  });

  it('serves Prometheus metrics from the server and the agent', async () => {
    const server = await (await fetch(`${h.url}/metrics`)).text();
    expect(server).toContain('devyard_nodes_ready 1');
    const [node] = json<Array<{ agentUrl: string }>>(['nodes']);
    const agent = await (await fetch(`${node!.agentUrl}/metrics`)).text();
    expect(agent).toContain('devyard_agent_server_reachable 1');
  });

  it('creates a box and waits until it runs', () => {
    const r = cli(h, ['create', 'demo', '--template', 'tiny', '--memory', '256MiB', '--wait', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const box = JSON.parse(r.stdout);
    expect(box).toMatchObject({ name: 'demo', template: 'tiny', desiredState: 'running', phase: 'running', runtime: 'sandbox' });
    expect(box.node).toBeTruthy();
    expect(box.ip).toMatch(/^10\.215\.0\.\d+$/);
    expect(r.stderr).toContain('demo: running');
  });

  it('execs with exit codes, stdin and a terminal', () => {
    const r = cli(h, ['exec', 'demo', '--', 'sh', '-c', 'echo out; echo err >&2; exit 7']);
    expect(r).toMatchObject({ code: 7, stdout: 'out\n', stderr: 'err\n' });
    expect(cli(h, ['exec', 'demo', '-i', '--', 'wc', '-c'], 'hello').stdout.trim()).toBe('5');
    expect(cliOk(h, ['exec', 'demo', '-t', '--', 'sh', '-c', '[ -t 0 ] && echo tty']).trim()).toBe('tty');
    expect(cliOk(h, ['exec', 'demo', '--', 'hostname']).trim()).toBe('demo');
    expect(cliOk(h, ['exec', 'demo', '--', 'pwd']).trim()).toBe('/workspace');
  });

  it('lists and gets boxes, in text and JSON, and says what pause keeps', () => {
    const list = json<Array<Record<string, unknown>>>(['list']);
    expect(list.map((b) => b.name)).toEqual(['demo']);
    for (const field of ['name', 'template', 'desiredState', 'phase', 'node', 'runtime']) expect(list[0]).toHaveProperty(field);
    const text = cliOk(h, ['get', 'demo']);
    expect(text).toMatch(/State\s+running \(desired: running\)/);
    expect(text).toMatch(/Pause\s+keeps process memory/);
    expect(cliOk(h, ['list'])).toMatch(/demo\s+tiny:1\s+sandbox\s+running/);
  });

  it('pauses with the freezer (a counter stops, keeps its value) and resumes it', async () => {
    cliOk(h, ['exec', 'demo', '--', 'sh', '-c', 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.tmp; mv /tmp/counter.tmp /tmp/counter; sleep 0.05; done > /dev/null 2>&1 &']);
    await new Promise((r) => setTimeout(r, 600));
    expect(counter()).toBeGreaterThan(2);
    const box = json<{ id: string }>(['pause', 'demo', '--wait']);
    expect(box).toMatchObject({ phase: 'paused', desiredState: 'paused' });
    // Read the counter from the host side of the box's overlay: exec is refused while paused.
    // A box with a disk size keeps its upper on its own disk, mounted at disk/ in its directory.
    const boxDir = join(h.dataDir, 'node/sandbox/boxes', box.id);
    const upper = existsSync(join(boxDir, 'disk/upper')) ? join(boxDir, 'disk/upper') : join(boxDir, 'upper');
    const onHost = () => Number(readFileSync(join(upper, 'tmp/counter'), 'utf8'));
    const frozen = onHost();
    const refused = cli(h, ['exec', 'demo', '--', 'true']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr.trim().split('\n')).toHaveLength(1);
    expect(refused.stderr).toContain('paused');
    await new Promise((r) => setTimeout(r, 500));
    expect(onHost()).toBe(frozen);
    expect(json(['resume', 'demo', '--wait'])).toMatchObject({ phase: 'running' });
    // Memory was kept: the loop continues from its value instead of starting over at 1.
    const after = counter();
    expect(after).toBeGreaterThanOrEqual(frozen);
    await new Promise((r) => setTimeout(r, 400));
    expect(counter()).toBeGreaterThan(after);
  });

  it('refuses verbs that make no sense, with one readable line', () => {
    const r = cli(h, ['start', 'nope']);
    expect(r.code).toBe(4);
    expect(r.stderr).toBe('devyard: error: box "nope" not found\n');
    const dup = cli(h, ['create', 'demo', '--template', 'tiny']);
    expect(dup.code).toBe(1);
    expect(dup.stderr).toContain('already exists');
    const badTemplate = cli(h, ['create', 'other', '--template', 'nope']);
    expect(badTemplate.stderr).toContain('template "nope" does not exist');
    const badMem = cli(h, ['create', 'other', '--template', 'tiny', '--memory', 'lots']);
    expect(badMem.stderr).toContain('resources.memory');
    expect(json<unknown[]>(['list'])).toHaveLength(1);
  });

  it('keeps /workspace and /root over stop and start; stop ends every process', () => {
    cliOk(h, ['exec', 'demo', '--', 'sh', '-c', 'echo kept > /workspace/file; echo home > /root/.note']);
    expect(json(['stop', 'demo', '--wait'])).toMatchObject({ phase: 'stopped' });
    const stopped = cli(h, ['exec', 'demo', '--', 'true']);
    expect(stopped.stderr).toContain('stopped');
    expect(json(['start', 'demo', '--wait'])).toMatchObject({ phase: 'running' });
    expect(cliOk(h, ['exec', 'demo', '--', 'cat', '/workspace/file', '/root/.note'])).toBe('kept\nhome\n');
    // A cold boot: the counter loop from before the stop is gone.
    expect(cliOk(h, ['exec', 'demo', '--', 'sh', '-c', 'ps | grep -c "[s]leep 0.05" || true']).trim()).toBe('0');
  });

  it('shows the event timeline', () => {
    const out = cliOk(h, ['events', 'demo']);
    for (const t of ['Created', 'Scheduled', 'PauseRequested', 'ResumeRequested', 'StopRequested', 'StartRequested']) expect(out).toContain(t);
  });

  it('survives kill -9 of the whole all-in-one process: boxes keep running and are adopted', async () => {
    cliOk(h, ['exec', 'demo', '--', 'sh', '-c', 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.tmp; mv /tmp/counter.tmp /tmp/counter; sleep 0.05; done > /dev/null 2>&1 &']);
    await new Promise((r) => setTimeout(r, 300));
    const before = counter();
    await kill9(h.proc);
    await new Promise((r) => setTimeout(r, 500));
    await startUp(h);
    const b = json(['get', 'demo']);
    expect(b).toMatchObject({ phase: 'running', desiredState: 'running' });
    // Same processes, still counting: the box was adopted, not restarted.
    expect(counter()).toBeGreaterThan(before + 5);
  });

  it('deletes the box and leaves nothing behind on the host', () => {
    const id = json<{ id: string }>(['get', 'demo']).id;
    cliOk(h, ['delete', 'demo', '--wait']);
    expect(json<unknown[]>(['list'])).toHaveLength(0);
    const boxesDir = join(h.dataDir, 'node', 'sandbox', 'boxes');
    expect(existsSync(boxesDir) ? readdirSync(boxesDir) : []).toEqual([]);
    expect(execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })).not.toContain(id);
    expect(readFileSync('/proc/mounts', 'utf8')).not.toContain(id);
    const ps = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' });
    expect(ps).not.toContain(id);
    for (const ctl of ['memory', 'pids', 'cpu', 'freezer']) {
      const dir = `/sys/fs/cgroup/${ctl}/devyard/${id}`;
      expect(existsSync(dir), dir).toBe(false);
    }
    // The name is free again.
    expect(cli(h, ['get', 'demo']).code).toBe(4);
  });
});

describe('the base template (Debian bookworm), as in the README', () => {
  it('creates a Debian box and runs uname, bash, git and curl in it', () => {
    // First use builds the image with debootstrap (about a minute); it is cached by digest after.
    const r = cli(h, ['create', 'deb', '--template', 'base', '--wait']);
    expect(r.code, r.stderr).toBe(0);
    expect(cliOk(h, ['exec', 'deb', '--', 'uname', '-a'])).toMatch(/^Linux deb /);
    const tools = cliOk(h, ['exec', 'deb', '--', 'bash', '-c', 'git --version && curl --version | head -1 && . /etc/os-release && echo $VERSION_CODENAME']);
    expect(tools).toMatch(/git version/);
    expect(tools).toMatch(/curl \d/);
    expect(tools).toMatch(/bookworm/);
    cliOk(h, ['delete', 'deb', '--wait']);
  }, 600_000);
});
