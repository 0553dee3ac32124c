/** The box network: address math, bridge/NAT setup, namespace attach/detach leaving nothing. */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, describe, expect, test } from 'vitest';
import { BridgeNetwork } from '@devyard/agent/network/bridge-network';
import { allocateAddress, gatewayAddress, parseSubnet, subnetContains } from '@devyard/agent/network/ipv4-subnet';

describe('ipv4 subnet', () => {
  test('gateway and allocation', () => {
    const s = parseSubnet('10.213.0.0/16');
    expect(gatewayAddress(s)).toBe('10.213.0.1');
    expect(allocateAddress(s, [])).toBe('10.213.0.2');
    expect(allocateAddress(s, ['10.213.0.2', '10.213.0.3'])).toBe('10.213.0.4');
    expect(subnetContains(s, '10.213.255.254')).toBe(true);
    expect(subnetContains(s, '10.214.0.1')).toBe(false);
    const small = parseSubnet('192.168.5.0/30');
    expect(allocateAddress(small, [])).toBe('192.168.5.2');
    expect(() => allocateAddress(small, ['192.168.5.2'])).toThrow(/no free address/);
    expect(() => parseSubnet('10.0.0.0/40')).toThrow();
  });
});

describe('bridge network', () => {
  const suffix = Math.random().toString(36).slice(2, 7);
  const net = new BridgeNetwork({ bridge: `dyn${suffix}`, subnet: '10.233.0.0/16', nftTable: `devyard_n_${suffix}`, netnsPrefix: 'dyn-', vethPrefix: 'dyn' });

  afterAll(async () => {
    await net.detach('b_net1');
    await net.teardown();
  });

  test('init is idempotent; attach configures the namespace; detach leaves nothing', async () => {
    await net.init();
    await net.init();
    expect(readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8').trim()).toBe('1');
    const rules = execFileSync('nft', ['list', 'table', 'inet', `devyard_n_${suffix}`], { encoding: 'utf8' });
    expect(rules).toContain('masquerade');
    expect(rules).toContain('10.233.0.0/16');
    expect(net.vethName('b_' + 'x'.repeat(38)).length).toBeLessThanOrEqual(15);
    expect(net.vethName('b_net1')).toBe(net.vethName('b_net1'));

    await net.attach('b_net1', '10.233.0.2');
    const veth = net.vethName('b_net1');
    expect(execFileSync('ip', ['-d', 'link', 'show', veth], { encoding: 'utf8' })).toMatch(/isolated on/);
    const addr = execFileSync('ip', ['-n', net.netnsName('b_net1'), 'addr', 'show', 'eth0'], { encoding: 'utf8' });
    expect(addr).toContain('10.233.0.2/16');
    const route = execFileSync('ip', ['-n', net.netnsName('b_net1'), 'route'], { encoding: 'utf8' });
    expect(route).toContain('default via 10.233.0.1');
    // Attaching again converges (a stale namespace is replaced).
    await net.attach('b_net1', '10.233.0.2');
    await net.detach('b_net1');
    await net.detach('b_net1');
    expect(existsSync(net.netnsPath('b_net1'))).toBe(false);
    expect(existsSync(`/sys/class/net/${veth}`)).toBe(false);
  });

  test('resolv.conf drops loopback nameservers', async () => {
    const text = await net.resolvConf();
    expect(text).not.toMatch(/nameserver (127\.|::1)/);
  });
});
