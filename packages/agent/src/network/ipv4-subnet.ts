/**
 * IPv4 subnet arithmetic for the box network: the bridge takes the first host address and boxes
 * get the lowest free address after it.
 */

/** A parsed IPv4 CIDR block. */
export interface Ipv4Subnet {
  /** Network address as an unsigned 32-bit integer. */
  base: number;
  /** Prefix length (8–30). */
  prefix: number;
}

/** Parses a dotted quad into an unsigned integer. */
export function ipToInt(ip: string): number {
  const parts = ip.split('.').map((p) => Number(p));
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) {
    throw new Error(`invalid IPv4 address: ${ip}`);
  }
  return ((parts[0]! << 24) >>> 0) + (parts[1]! << 16) + (parts[2]! << 8) + parts[3]!;
}

/** Formats an unsigned integer as a dotted quad. */
export function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/** Parses `a.b.c.d/len`. */
export function parseSubnet(cidr: string): Ipv4Subnet {
  const [ip, len] = cidr.split('/');
  const prefix = Number(len);
  if (ip === undefined || !Number.isInteger(prefix) || prefix < 8 || prefix > 30) {
    throw new Error(`invalid subnet: ${cidr}`);
  }
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return { base: (ipToInt(ip) & mask) >>> 0, prefix };
}

/** The bridge (gateway) address: the first host address of the subnet. */
export function gatewayAddress(subnet: Ipv4Subnet): string {
  return intToIp(subnet.base + 1);
}

/** The lowest address of the subnet not in `used` (gateway, network and broadcast excluded). */
export function allocateAddress(subnet: Ipv4Subnet, used: Iterable<string>): string {
  const taken = new Set(used);
  const size = 2 ** (32 - subnet.prefix);
  for (let i = 2; i < size - 1; i++) {
    const ip = intToIp(subnet.base + i);
    if (!taken.has(ip)) return ip;
  }
  throw new Error(`no free address in ${intToIp(subnet.base)}/${subnet.prefix}`);
}

/** Whether `ip` lies inside `subnet`. */
export function subnetContains(subnet: Ipv4Subnet, ip: string): boolean {
  const size = 2 ** (32 - subnet.prefix);
  const n = ipToInt(ip);
  return n >= subnet.base && n < subnet.base + size;
}
