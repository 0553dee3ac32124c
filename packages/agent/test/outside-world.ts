/**
 * "The rest of the world" for network tests: a network namespace routed from the host through a
 * veth pair, whose loopback holds the addresses a test names (a stand-in internet address from a
 * documentation range, the cloud metadata address, private addresses), each with a TCP server
 * answering `hello <address>`. No packet leaves this machine. `close()` removes everything.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';

/** A stand-in internet address (TEST-NET-2: documentation only, routed here to our namespace). */
export const INTERNET = '198.51.100.10';

const sh = (...argv: string[]): string => {
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${argv.join(' ')}: ${r.stderr}`);
  return r.stdout;
};

export interface OutsideWorld {
  /** The namespace's name (for `ip -n`, nsenter). */
  ns: string;
  /** The host's address on the link to it (what masqueraded box traffic comes from). */
  hostAddress: string;
  /** Starts another TCP server answering `hello <name>` in a namespace (null: the host's). */
  listen(ns: string | null, host: string, port: number, name: string): Promise<void>;
  close(): void;
}

/** Builds the namespace with `addresses` on its loopback and a server on `port` at each. */
export async function startOutsideWorld(tag: string, addresses: string[], port: number): Promise<OutsideWorld> {
  const ns = `dyo-${tag}`;
  const veth = `dyo${tag}`;
  const children: ChildProcess[] = [];
  const listen = async (inNs: string | null, host: string, p: number, name: string) => {
    const src = `require('net').createServer((c)=>c.end('hello ${name}\\n')).listen(${p},'${host}',()=>console.log('ready'))`;
    const argv = inNs ? ['nsenter', `--net=/run/netns/${inNs}`, process.execPath, '-e', src] : [process.execPath, '-e', src];
    // host-programs: nsenter
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
    children.push(child);
    await new Promise<void>((resolve, reject) => {
      child.stdout!.once('data', () => resolve());
      child.once('exit', (code) => reject(new Error(`listener ${name} exited ${code}`)));
    });
  };
  const close = () => {
    for (const c of children) c.kill('SIGKILL');
    spawnSync('ip', ['link', 'del', veth]);
    spawnSync('ip', ['netns', 'del', ns]);
  };
  try {
    sh('ip', 'netns', 'add', ns);
    sh('ip', 'link', 'add', veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
    sh('ip', 'addr', 'add', '203.0.113.1/30', 'dev', veth);
    sh('ip', 'link', 'set', veth, 'up');
    for (const cmd of [
      ['addr', 'add', '203.0.113.2/30', 'dev', 'eth0'],
      ['link', 'set', 'eth0', 'up'],
      ['link', 'set', 'lo', 'up'],
      // No dummy interfaces without kernel modules: the namespace's loopback holds the addresses.
      ...addresses.map((a) => ['addr', 'add', `${a}/32`, 'dev', 'lo']),
      ['route', 'add', 'default', 'via', '203.0.113.1'],
    ]) sh('ip', '-n', ns, ...cmd);
    for (const a of addresses) sh('ip', 'route', 'add', `${a}/32`, 'via', '203.0.113.2');
    for (const a of addresses) await listen(ns, a, port, a);
  } catch (e) {
    close();
    throw e;
  }
  return { ns, hostAddress: '203.0.113.1', listen, close };
}
