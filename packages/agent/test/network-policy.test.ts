/**
 * What a box's network lets it reach, tried from a real box network namespace on a real bridge:
 * the host's own services, the cloud metadata address, private addresses, the other runtime's
 * bridge and connections from outside are refused; the internet and the host's DNS resolvers are
 * reachable; a box cannot send with another address or MAC than its own. "Outside" is a namespace
 * of this test (outside-world.ts); no packet leaves this machine.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BridgeNetwork } from '@devyard/agent/network/bridge-network';
import { INTERNET, startOutsideWorld, type OutsideWorld } from './outside-world.js';

const s = Math.random().toString(36).slice(2, 6);
const METADATA = '169.254.169.254';
const PRIVATE = '192.168.77.1';
const RESOLVER = '192.168.77.53';
const PORT = 8080;

const dir = mkdtempSync(join(tmpdir(), 'dy-netpol-'));
writeFileSync(join(dir, 'resolv.conf'), `nameserver ${RESOLVER}\n`);
const sandboxNet = new BridgeNetwork({ bridge: `dyp${s}`, subnet: '10.236.0.0/16', nftTable: `devyard_p_${s}`, netnsPrefix: 'dyp-', vethPrefix: 'dyp', resolvConfPath: join(dir, 'resolv.conf') });
const vmNet = new BridgeNetwork({ bridge: `dyq${s}`, subnet: '10.237.0.0/16', nftTable: `devyard_q_${s}`, netnsPrefix: 'dyq-', vethPrefix: 'dyq', resolvConfPath: join(dir, 'resolv.conf') });
const servers: ChildProcess[] = [];
let world: OutsideWorld;

const sh = (...argv: string[]) => {
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${argv.join(' ')}: ${r.stderr}`);
  return r.stdout;
};

/** Connects from a namespace; 'hello …' when it got through, else 'refused' or 'timeout'. */
function probe(ns: string, host: string, port = PORT, opts: { localAddress?: string } = {}): string {
  const src = `const c=require('net').connect({host:'${host}',port:${port}${opts.localAddress ? `,localAddress:'${opts.localAddress}'` : ''}});let d='';c.setTimeout(1200,()=>{console.log('timeout');process.exit()});c.on('data',(b)=>d+=b);c.on('end',()=>{console.log(d.trim());process.exit()});c.on('error',(e)=>{console.log(e.code==='ECONNREFUSED'?'refused':e.code);process.exit()})`;
  return sh('nsenter', `--net=/run/netns/${ns}`, process.execPath, '-e', src).trim();
}

const hostAddress = () => Object.values(networkInterfaces()).flat().find((a) => a && a.family === 'IPv4' && !a.internal)!.address;

beforeAll(async () => {
  await sandboxNet.init();
  await vmNet.init();
  await sandboxNet.attach('b_a', '10.236.0.2');
  await sandboxNet.attach('b_b', '10.236.0.3');
  await vmNet.attach('b_vm', '10.237.0.2');
  world = await startOutsideWorld(s, [INTERNET, METADATA, PRIVATE, RESOLVER], PORT);
  const listen = world.listen;
  await listen(world.ns, RESOLVER, 53, 'dns');
  await listen(world.ns, PRIVATE, 53, 'not-a-resolver');
  await listen(null, '0.0.0.0', PORT + 1, 'host');
  await listen(sandboxNet.netnsName('b_b'), '0.0.0.0', PORT, 'box-b');
  await listen(vmNet.netnsName('b_vm'), '0.0.0.0', PORT, 'vm');
}, 60_000);

afterAll(async () => {
  for (const p of servers) p.kill('SIGKILL');
  for (const id of ['b_a', 'b_b']) await sandboxNet.detach(id);
  await vmNet.detach('b_vm');
  world?.close();
  await sandboxNet.teardown();
  await vmNet.teardown();
  rmSync(dir, { recursive: true, force: true });
});

describe('a box network reaches the internet and nothing internal', () => {
  const A = () => sandboxNet.netnsName('b_a');

  it('reaches the internet (through NAT)', () => {
    expect(probe(A(), INTERNET)).toBe(`hello ${INTERNET}`);
  });

  it('does not reach the cloud metadata address or private addresses', () => {
    expect(probe(A(), METADATA)).toBe('timeout');
    expect(probe(A(), PRIVATE)).toBe('timeout');
  });

  it("reaches the host's DNS resolver on port 53, and nothing else there", () => {
    expect(probe(A(), RESOLVER, 53)).toBe('hello dns');
    expect(probe(A(), RESOLVER, PORT)).toBe('timeout');
    expect(probe(A(), PRIVATE, 53)).toBe('timeout');
  });

  it("does not reach the host's own services, on the bridge address or any other", () => {
    expect(probe(A(), sandboxNet.gateway, PORT + 1)).toBe('timeout');
    expect(probe(A(), hostAddress(), PORT + 1)).toBe('timeout');
    // The host still answers ICMP echo: a box can tell its link is up.
    expect(sh('nsenter', `--net=/run/netns/${A()}`, 'busybox', 'ping', '-c', '1', '-W', '2', sandboxNet.gateway)).toContain('1 packets received');
  });

  it('does not reach another box, on its bridge or on the other runtime\'s', () => {
    expect(probe(A(), '10.236.0.3')).toBe('timeout');
    expect(probe(A(), '10.237.0.2')).toBe('timeout');
    expect(probe(vmNet.netnsName('b_vm'), '10.236.0.3')).toBe('timeout');
  });

  it('accepts no connection from outside', () => {
    sh('ip', '-n', world.ns, 'route', 'add', '10.236.0.0/16', 'via', '203.0.113.1');
    try {
      expect(probe(world.ns, '10.236.0.3')).toBe('timeout');
    } finally {
      sh('ip', '-n', world.ns, 'route', 'del', '10.236.0.0/16', 'via', '203.0.113.1');
    }
  });
});

describe('a box port only carries its own addresses', () => {
  const A = () => sandboxNet.netnsName('b_a');

  it('drops packets sent from an address that is not the box\'s', async () => {
    // A UDP receiver outside records the source of each datagram it gets.
    const src = "const s=require('dgram').createSocket('udp4');s.on('message',(m,r)=>console.log(r.address+' '+m));s.bind(9999,'" + INTERNET + "',()=>console.log('ready'))";
    const receiver = spawn('nsenter', [`--net=/run/netns/${world.ns}`, process.execPath, '-e', src], { stdio: ['ignore', 'pipe', 'inherit'] });
    servers.push(receiver);
    let seen = '';
    receiver.stdout!.on('data', (b: Buffer) => (seen += b.toString()));
    await new Promise((r) => receiver.stdout!.once('data', r));
    const send = (from: string, text: string) =>
      sh('nsenter', `--net=/run/netns/${A()}`, process.execPath, '-e', `const s=require('dgram').createSocket('udp4');s.bind({address:'${from}'},()=>s.send('${text}',9999,'${INTERNET}',()=>s.close()))`);
    // An address outside the box subnet would leave un-NATed, forged, as a reflection attack needs.
    sh('ip', '-n', A(), 'addr', 'add', '100.70.0.5/32', 'dev', 'eth0');
    try {
      for (let i = 0; i < 3; i++) send('100.70.0.5', 'spoofed');
      for (let i = 0; i < 3; i++) send('10.236.0.2', 'own');
      await new Promise((r) => setTimeout(r, 500));
    } finally {
      sh('ip', '-n', A(), 'addr', 'del', '100.70.0.5/32', 'dev', 'eth0');
    }
    expect(seen).toContain('203.0.113.1 own');
    expect(seen).not.toContain('spoofed');
  });

  it('drops frames from another MAC', () => {
    const mac = sh('ip', '-n', A(), '-j', 'link', 'show', 'eth0');
    const own = (JSON.parse(mac) as Array<{ address: string }>)[0]!.address;
    sh('ip', '-n', A(), 'link', 'set', 'eth0', 'address', '52:54:00:de:ad:01');
    try {
      expect(probe(A(), INTERNET)).toBe('timeout');
    } finally {
      sh('ip', '-n', A(), 'link', 'set', 'eth0', 'address', own);
    }
    expect(probe(A(), INTERNET)).toBe(`hello ${INTERNET}`);
  });

  it('forgets a port when its box is detached', async () => {
    await sandboxNet.attach('b_gone', '10.236.0.9');
    const port = sandboxNet.vethName('b_gone');
    expect(sh('nft', 'list', 'set', 'bridge', `devyard_p_${s}`, 'port_ip')).toContain(port);
    await sandboxNet.detach('b_gone');
    for (const set of ['ports', 'port_ip', 'port_mac']) expect(sh('nft', 'list', 'set', 'bridge', `devyard_p_${s}`, set)).not.toContain(port);
  });
});
