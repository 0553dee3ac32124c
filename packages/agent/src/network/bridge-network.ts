/**
 * The node's box network: one Linux bridge with the gateway address, one host-owned network
 * namespace per box joined to the bridge through a veth pair, NAT egress through an nftables
 * masquerade rule in a table of our own, and no traffic between boxes (isolated bridge ports, plus
 * a drop rule for traffic routed back onto the bridge).
 *
 * The namespaces are created by host root, so a box's root (mapped to an unprivileged uid) has no
 * CAP_NET_ADMIN over its own interfaces: it can neither change its address nor its routes.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
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
}

/** Box network attachment details, used to write the box's /etc files. */
export interface BoxNetworkAttachment {
  /** Network namespace path the box joins. */
  netnsPath: string;
  /** The box's address. */
  ip: string;
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

  constructor(opts: BridgeNetworkOptions = {}) {
    this.bridge = opts.bridge ?? 'devyard0';
    this.cidr = opts.subnet ?? '10.213.0.0/16';
    this.subnet = parseSubnet(this.cidr);
    this.gateway = gatewayAddress(this.subnet);
    this.nftTable = opts.nftTable ?? 'devyard';
    this.netnsPrefix = opts.netnsPrefix ?? 'dy-';
    this.vethPrefix = opts.vethPrefix ?? 'dy';
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
    // Recreate our table atomically: "add table" makes the delete succeed on a first run.
    const br = JSON.stringify(this.bridge);
    await runHostCommand(['nft', '-f', '-'], {
      input: [
        `add table inet ${this.nftTable}`,
        `delete table inet ${this.nftTable}`,
        `table inet ${this.nftTable} {`,
        `  chain postrouting {`,
        `    type nat hook postrouting priority srcnat; policy accept;`,
        `    ip saddr ${this.cidr} oifname != ${br} masquerade`,
        `  }`,
        `  chain forward {`,
        `    type filter hook forward priority filter; policy accept;`,
        // Boxes must not reach each other through the host's routing either.
        `    iifname ${br} oifname ${br} drop`,
        `  }`,
        `}`,
        '',
      ].join('\n'),
    });
  }

  /** Removes the bridge and the NAT table (uninstall and tests); boxes must be gone already. */
  async teardown(): Promise<void> {
    await runHostCommandRaw(['nft', 'delete', 'table', 'inet', this.nftTable]);
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
    await runHostCommand(['ip', '-batch', '-'], {
      input:
        `link add ${veth} type veth peer name eth0 netns ${ns}\n` +
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
   * sandbox's veth, so the same NAT, drop rule and {@link detach} apply; replaces a stale one.
   */
  async attachTap(boxId: string): Promise<string> {
    const tap = this.vethName(boxId);
    if (existsSync(`/sys/class/net/${tap}`)) await runHostCommandRaw(['ip', 'link', 'del', tap]);
    await runHostCommand(['ip', '-batch', '-'], {
      input:
        `tuntap add dev ${tap} mode tap\n` +
        `link set ${tap} master ${this.bridge}\n` +
        `link set dev ${tap} type bridge_slave isolated on learning on\n` +
        `link set ${tap} up\n`,
    });
    return tap;
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
  }

  /** Contents of a box's /etc/resolv.conf: the host's nameservers, minus loopback ones. */
  async resolvConf(): Promise<string> {
    let text = '';
    try {
      text = await readFile('/etc/resolv.conf', 'utf8');
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
