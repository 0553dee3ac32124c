/**
 * The node's box network: one Linux bridge with the gateway address, one host-owned network
 * namespace per box joined to the bridge through a veth pair (or a microVM's TAP device), and NAT
 * egress through an nftables masquerade rule in a table of our own.
 *
 * What a box may reach, by default (a Kubernetes default-deny for everything but the internet):
 * - the internet, and the host's DNS resolvers on port 53;
 * - not the host itself (any of its addresses; ICMP echo only, so a box can tell the link is up),
 *   not another box (isolated bridge ports, and a drop for traffic routed back onto the bridge),
 *   not another bridge of this host (the sandbox and microVM networks), not a private, shared,
 *   link-local (cloud metadata), loopback or multicast address, and no IPv6;
 * - nothing from elsewhere opens a connection to a box (the gateway reaches boxes through the
 *   node agent, inside their namespaces).
 * Every box port only sends frames with its own MAC and IPv4 address (a bridge-family table):
 * a microVM guest, root in its own kernel, could otherwise spoof another box's address.
 *
 * The namespaces are created by host root, so a box's root (mapped to an unprivileged uid) has no
 * CAP_NET_ADMIN over its own interfaces: it can neither change its address nor its routes.
 */
import { createHash } from 'node:crypto';
import { isIP } from 'node:net';
import { existsSync, readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { runHostCommand, runHostCommandRaw } from './host-command-runner.js';
import { gatewayAddress, parseSubnet, subnetContains, type Ipv4Subnet } from './ipv4-subnet.js';

/** Settings of the box network; tests pass their own names so they never touch a live node's. */
export interface BridgeNetworkOptions {
  /** Bridge interface name (≤ 15 chars), default `devyard0`. */
  bridge?: string;
  /** Box subnet in CIDR form, default `10.213.0.0/16`; the bridge takes its first address. */
  subnet?: string;
  /** nftables table name (family inet), default `devyard`. */
  nftTable?: string;
  /** Prefix of network namespace names (`<prefix><boxId>`), default `dy-`. */
  netnsPrefix?: string;
  /** Prefix of host veth names (prefix + hash, ≤ 15 chars), default `dy`. */
  vethPrefix?: string;
  /** The resolver configuration boxes get theirs from, default `/etc/resolv.conf`. */
  resolvConfPath?: string;
}

/** Box network attachment details, used to write the box's /etc files. */
export interface BoxNetworkAttachment {
  /** Network namespace path the box joins. */
  netnsPath: string;
  /** The box's address. */
  ip: string;
}

/** Destinations a box never reaches (RFC 6890 special-purpose ranges: private, shared, loopback, link-local, multicast, reserved). */
export const BLOCKED_DESTINATIONS = ['0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12', '192.0.0.0/24', '192.168.0.0/16', '198.18.0.0/15', '224.0.0.0/4', '240.0.0.0/4'];

/** A stable locally administered MAC per box (its veth's or its microVM's NIC). */
export function boxMac(boxId: string): string {
  const h = createHash('sha256').update(boxId).digest();
  return ['52', '54', ...[h[0]!, h[1]!, h[2]!, h[3]!].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

/** Manages the bridge, NAT and per-box network namespaces. */
export class BridgeNetwork {
  /** Bridge interface name. */
  readonly bridge: string;
  /** Parsed box subnet. */
  readonly subnet: Ipv4Subnet;
  /** Gateway (bridge) address. */
  readonly gateway: string;
  private readonly nftTable: string;
  private readonly netnsPrefix: string;
  private readonly vethPrefix: string;
  private readonly cidr: string;
  private readonly resolvConfPath: string;

  constructor(opts: BridgeNetworkOptions = {}) {
    this.bridge = opts.bridge ?? 'devyard0';
    this.cidr = opts.subnet ?? '10.213.0.0/16';
    this.subnet = parseSubnet(this.cidr);
    this.gateway = gatewayAddress(this.subnet);
    this.nftTable = opts.nftTable ?? 'devyard';
    this.netnsPrefix = opts.netnsPrefix ?? 'dy-';
    this.vethPrefix = opts.vethPrefix ?? 'dy';
    this.resolvConfPath = opts.resolvConfPath ?? '/etc/resolv.conf';
    if (this.bridge.length > 15) throw new Error(`bridge name too long: ${this.bridge}`);
    if (this.vethPrefix.length > 3) throw new Error(`veth prefix too long: ${this.vethPrefix}`);
  }

  /** Network namespace name of a box. */
  netnsName(boxId: string): string {
    return `${this.netnsPrefix}${boxId}`;
  }

  /** Path of a box's network namespace file. */
  netnsPath(boxId: string): string {
    return `/run/netns/${this.netnsName(boxId)}`;
  }

  /** Host-side veth name of a box: a stable hash, because interface names are limited to 15 chars. */
  vethName(boxId: string): string {
    const hash = createHash('sha256').update(boxId).digest('hex');
    return `${this.vethPrefix}${hash.slice(0, 15 - this.vethPrefix.length - 1)}`;
  }

  /** Whether an address belongs to this network's subnet. */
  contains(ip: string): boolean {
    return subnetContains(this.subnet, ip);
  }

  /** Creates the bridge, its address, the NAT table and enables forwarding; idempotent. */
  async init(): Promise<void> {
    if (!existsSync(`/sys/class/net/${this.bridge}`)) {
      const r = await runHostCommandRaw(['ip', 'link', 'add', this.bridge, 'type', 'bridge']);
      if (r.code !== 0 && !existsSync(`/sys/class/net/${this.bridge}`)) {
        throw new Error(`cannot create bridge ${this.bridge}: ${r.stderr.trim()}`);
      }
    }
    await runHostCommand(['ip', '-batch', '-'], {
      input:
        `addr replace ${this.gateway}/${this.subnet.prefix} dev ${this.bridge}\n` +
        `link set ${this.bridge} up\n`,
    });
    await writeFile('/proc/sys/net/ipv4/ip_forward', '1\n');
    // The routing table is recreated atomically ("add table" makes the delete succeed on a first
    // run); the port table keeps its sets, so boxes that outlive an agent restart stay registered.
    const br = JSON.stringify(this.bridge);
    const resolvers = await this.resolverAddresses();
    const t = this.nftTable;
    await runHostCommand(['nft', '-f', '-'], {
      input: [
        `add table inet ${t}`,
        `delete table inet ${t}`,
        `table inet ${t} {`,
        `  set resolvers { type ipv4_addr; ${resolvers.length ? `elements = { ${resolvers.join(', ')} }` : ''} }`,
        `  chain postrouting {`,
        `    type nat hook postrouting priority srcnat; policy accept;`,
        `    ip saddr ${this.cidr} oifname != ${br} masquerade`,
        `  }`,
        `  chain input {`,
        `    type filter hook input priority filter; policy accept;`,
        `    iifname ${br} ct state established,related accept`,
        `    iifname ${br} icmp type echo-request accept`,
        `    iifname ${br} drop`,
        `  }`,
        `  chain forward {`,
        `    type filter hook forward priority filter; policy accept;`,
        // Boxes must not reach each other through the host's routing either.
        `    iifname ${br} oifname ${br} drop`,
        `    iifname ${br} ct state established,related accept`,
        `    iifname ${br} ip daddr @resolvers meta l4proto { tcp, udp } th dport 53 accept`,
        `    iifname ${br} ip daddr { ${BLOCKED_DESTINATIONS.join(', ')} } drop`,
        `    iifname ${br} meta nfproto ipv6 drop`,
        `    oifname ${br} ct state established,related accept`,
        `    oifname ${br} drop`,
        `  }`,
        `}`,
        `add table bridge ${t}`,
        `add set bridge ${t} ports { type ifname; }`,
        `add set bridge ${t} port_ip { type ifname . ipv4_addr; }`,
        `add set bridge ${t} port_mac { type ifname . ether_addr; }`,
        `add chain bridge ${t} prerouting { type filter hook prerouting priority filter; policy accept; }`,
        `add chain bridge ${t} box_port`,
        `flush chain bridge ${t} prerouting`,
        `flush chain bridge ${t} box_port`,
        `add rule bridge ${t} prerouting iifname @ports jump box_port`,
        `add rule bridge ${t} box_port iifname . ether saddr != @port_mac drop`,
        `add rule bridge ${t} box_port ether type ip iifname . ip saddr != @port_ip drop`,
        `add rule bridge ${t} box_port ether type arp iifname . arp saddr ip != @port_ip drop`,
        `add rule bridge ${t} box_port ether type != { ip, arp } drop`,
        '',
      ].join('\n'),
    });
  }

  /** The host's IPv4 DNS resolvers that boxes use (their resolv.conf), reachable on port 53. */
  private async resolverAddresses(): Promise<string[]> {
    return (await this.resolvConf())
      .split('\n')
      .filter((l) => l.startsWith('nameserver '))
      .map((l) => l.slice(11).trim())
      .filter((a) => isIP(a) === 4);
  }

  /**
   * Lets a port of the bridge carry frames from `mac` and `ip` only. Registered before the port
   * joins the bridge, so it never carries an unchecked frame.
   */
  private async registerPort(port: string, ip: string, mac: string): Promise<void> {
    const t = this.nftTable;
    await runHostCommand(['nft', '-f', '-'], {
      input: [`add element bridge ${t} port_ip { "${port}" . ${ip} }`, `add element bridge ${t} port_mac { "${port}" . ${mac} }`, `add element bridge ${t} ports { "${port}" }`, ''].join('\n'),
    });
  }

  /** Forgets a port's addresses (its device is gone or going). */
  private async unregisterPort(port: string): Promise<void> {
    const t = this.nftTable;
    const lines: string[] = [];
    for (const set of ['port_ip', 'port_mac']) {
      const r = await runHostCommandRaw(['nft', '-j', 'list', 'set', 'bridge', t, set]);
      if (r.code !== 0) continue;
      const parsed = JSON.parse(r.stdout) as { nftables: Array<{ set?: { elem?: Array<{ concat: [string, string] }> } }> };
      for (const e of parsed.nftables.flatMap((x) => x.set?.elem ?? [])) {
        if (e.concat[0] === port) lines.push(`delete element bridge ${t} ${set} { "${port}" . ${e.concat[1]} }`);
      }
    }
    const inPorts = await runHostCommandRaw(['nft', 'get', 'element', 'bridge', t, 'ports', `{ "${port}" }`]);
    if (inPorts.code === 0) lines.push(`delete element bridge ${t} ports { "${port}" }`);
    if (lines.length) await runHostCommand(['nft', '-f', '-'], { input: `${lines.join('\n')}\n` });
  }

  /** Removes the bridge and the NAT table (uninstall and tests); boxes must be gone already. */
  async teardown(): Promise<void> {
    await runHostCommandRaw(['nft', 'delete', 'table', 'inet', this.nftTable]);
    await runHostCommandRaw(['nft', 'delete', 'table', 'bridge', this.nftTable]);
    if (existsSync(`/sys/class/net/${this.bridge}`)) {
      await runHostCommandRaw(['ip', 'link', 'del', this.bridge]);
    }
  }

  /**
   * Creates the box's (empty) network namespace; removes a stale one of the same box first, so it
   * converges after a crash. The box may join it before {@link configure} runs.
   */
  async createNamespace(boxId: string): Promise<string> {
    if (this.isAttached(boxId)) await this.detach(boxId);
    await runHostCommand(['ip', 'netns', 'add', this.netnsName(boxId)]);
    return this.netnsPath(boxId);
  }

  /** Puts the box's veth on the bridge, sets its address and default route inside its namespace. */
  async configure(boxId: string, ip: string): Promise<void> {
    const ns = this.netnsName(boxId);
    const veth = this.vethName(boxId);
    const mac = boxMac(boxId);
    await runHostCommand(['ip', 'link', 'add', veth, 'type', 'veth', 'peer', 'name', 'eth0', 'address', mac, 'netns', ns]);
    await this.registerPort(veth, ip, mac);
    await runHostCommand(['ip', '-batch', '-'], {
      input:
        `link set ${veth} master ${this.bridge}\n` +
        `link set dev ${veth} type bridge_slave isolated on learning on\n` +
        `link set ${veth} up\n`,
    });
    await runHostCommand(['ip', '-n', ns, '-batch', '-'], {
      input:
        `link set lo up\n` +
        `addr add ${ip}/${this.subnet.prefix} dev eth0\n` +
        `link set eth0 up\n` +
        `route add default via ${this.gateway}\n`,
    });
  }

  /** Creates and configures the box's namespace in one go. */
  async attach(boxId: string, ip: string): Promise<BoxNetworkAttachment> {
    const netnsPath = await this.createNamespace(boxId);
    await this.configure(boxId, ip);
    return { netnsPath, ip };
  }

  /**
   * Creates the box's TAP device (a microVM's NIC) on the bridge, isolated and named like a
   * sandbox's veth, so the same NAT, drop rules and {@link detach} apply; replaces a stale one.
   * The guest may only send from `mac` and `ip`. With an `owner`, that uid and gid may attach to
   * the device without any capability (the VM's unprivileged QEMU).
   */
  async attachTap(boxId: string, ip: string, mac: string, owner?: { uid: number; gid: number }): Promise<string> {
    const tap = this.vethName(boxId);
    if (existsSync(`/sys/class/net/${tap}`)) await runHostCommandRaw(['ip', 'link', 'del', tap]);
    await this.unregisterPort(tap);
    await runHostCommand(['ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap', ...(owner ? ['user', String(owner.uid), 'group', String(owner.gid)] : [])]);
    await this.registerPort(tap, ip, mac);
    await runHostCommand(['ip', '-batch', '-'], {
      input:
        `link set ${tap} master ${this.bridge}\n` +
        `link set dev ${tap} type bridge_slave isolated on learning on\n` +
        `link set ${tap} up\n`,
    });
    return tap;
  }

  /** The uid that may attach to the box's TAP device without privileges (undefined: none, or no device). */
  tapOwner(boxId: string): number | undefined {
    try {
      const uid = Number(readFileSync(`/sys/class/net/${this.vethName(boxId)}/owner`, 'utf8').trim());
      return uid >= 0 ? uid : undefined;
    } catch {
      return undefined;
    }
  }

  /** Whether the box has a network namespace or a veth on this host. */
  isAttached(boxId: string): boolean {
    return existsSync(this.netnsPath(boxId)) || existsSync(`/sys/class/net/${this.vethName(boxId)}`);
  }

  /** Deletes the box's namespace and veth; idempotent. */
  async detach(boxId: string): Promise<void> {
    if (existsSync(this.netnsPath(boxId))) {
      const r = await runHostCommandRaw(['ip', 'netns', 'del', this.netnsName(boxId)]);
      if (r.code !== 0 && existsSync(this.netnsPath(boxId))) {
        throw new Error(`cannot delete netns ${this.netnsName(boxId)}: ${r.stderr.trim()}`);
      }
    }
    const veth = this.vethName(boxId);
    if (existsSync(`/sys/class/net/${veth}`)) {
      // The pair normally dies with the namespace; a leftover host end means a half-done attach.
      await runHostCommandRaw(['ip', 'link', 'del', veth]);
    }
    await this.unregisterPort(veth);
  }

  /** Contents of a box's /etc/resolv.conf: the host's nameservers, minus loopback ones. */
  async resolvConf(): Promise<string> {
    let text = '';
    try {
      text = await readFile(this.resolvConfPath, 'utf8');
    } catch {
      text = '';
    }
    const lines: string[] = [];
    for (const raw of text.split('\n')) {
      const line = raw.trim();
      const [key, value] = line.split(/\s+/);
      if (key === 'nameserver' && value !== undefined) {
        if (value.startsWith('127.') || value === '::1' || value === '0.0.0.0') continue;
        lines.push(`nameserver ${value}`);
      } else if ((key === 'search' || key === 'options') && value !== undefined) {
        lines.push(line);
      }
    }
    return `${lines.join('\n')}\n`;
  }
}
