/**
 * Resource quantities and their arithmetic. CPU is counted in millicores so that every value is
 * an integer and sums never drift; memory and disk in bytes.
 */
import { DomainError } from './domain-error.js';

export interface Resources {
  /** CPU in millicores (1000 = one core). */
  cpuMillis: number;
  /** Memory in bytes. */
  memoryBytes: number;
  /** Disk in bytes. */
  diskBytes: number;
}

export const ZERO: Resources = Object.freeze({ cpuMillis: 0, memoryBytes: 0, diskBytes: 0 });

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  m: 1e6,
  mb: 1e6,
  g: 1e9,
  gb: 1e9,
  t: 1e12,
  tb: 1e12,
  ki: 1024,
  kib: 1024,
  mi: 1024 ** 2,
  mib: 1024 ** 2,
  gi: 1024 ** 3,
  gib: 1024 ** 3,
  ti: 1024 ** 4,
  tib: 1024 ** 4,
};

/** Parses "512MiB", "1GiB", "2G", "1073741824" into bytes. */
export function parseBytes(input: string | number, field = 'memory'): number {
  if (typeof input === 'number') {
    if (Number.isSafeInteger(input) && input > 0) return input;
    throw new DomainError('invalid-input', `${field} must be a positive whole number of bytes`, { field, value: input });
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(input);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new DomainError('invalid-input', `${field} "${input}" is not a size (use e.g. 512MiB, 1GiB, 2G)`, { field, value: input });
  }
  const bytes = Math.round(Number(m[1]) * unit);
  if (!(bytes > 0)) throw new DomainError('invalid-input', `${field} must be greater than zero`, { field, value: input });
  if (!Number.isSafeInteger(bytes)) throw new DomainError('invalid-input', `${field} is too large`, { field, value: input });
  return bytes;
}

/** Parses CPU as cores ("2", "0.5", 1.5) or millicores ("500m") into millicores. */
export function parseCpu(input: string | number, field = 'cpu'): number {
  let millis: number;
  if (typeof input === 'number') millis = Math.round(input * 1000);
  else {
    const m = /^\s*(\d+(?:\.\d+)?)(m?)\s*$/.exec(input);
    if (!m) throw new DomainError('invalid-input', `${field} "${input}" is not a CPU amount (use e.g. 2, 0.5 or 500m)`, { field, value: input });
    millis = m[2] ? Math.round(Number(m[1])) : Math.round(Number(m[1]) * 1000);
  }
  if (!(millis >= 10)) throw new DomainError('invalid-input', `${field} must be at least 10m (0.01 cores)`, { field, value: input });
  if (!Number.isSafeInteger(millis)) throw new DomainError('invalid-input', `${field} is too large`, { field, value: input });
  return millis;
}

export function add(a: Resources, b: Resources): Resources {
  return { cpuMillis: a.cpuMillis + b.cpuMillis, memoryBytes: a.memoryBytes + b.memoryBytes, diskBytes: a.diskBytes + b.diskBytes };
}

/** a − b, floored at zero so a double release can never produce negative allocation. */
export function subtract(a: Resources, b: Resources): Resources {
  return {
    cpuMillis: Math.max(0, a.cpuMillis - b.cpuMillis),
    memoryBytes: Math.max(0, a.memoryBytes - b.memoryBytes),
    diskBytes: Math.max(0, a.diskBytes - b.diskBytes),
  };
}

/** Only the compute part (CPU and memory) of a request: what stop releases and start reserves again. */
export function computeOnly(r: Resources): Resources {
  return { cpuMillis: r.cpuMillis, memoryBytes: r.memoryBytes, diskBytes: 0 };
}

/** Only the disk part: what a stopped box still holds on its node. */
export function diskOnly(r: Resources): Resources {
  return { cpuMillis: 0, memoryBytes: 0, diskBytes: r.diskBytes };
}

/** The names of the dimensions in which `request` does not fit into `capacity − allocated`. */
export function shortfall(capacity: Resources, allocated: Resources, request: Resources): Array<keyof Resources> {
  const free = subtract(capacity, allocated);
  return (Object.keys(request) as Array<keyof Resources>).filter((k) => request[k] > free[k]);
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  // Round before choosing the unit, so 1048575 B reads 1MiB rather than 1024.0KiB.
  while (Math.round(v * 10) / 10 >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(1)}${units[i]}`;
}

export function formatCpu(millis: number): string {
  return millis % 1000 === 0 ? String(millis / 1000) : `${millis}m`;
}
