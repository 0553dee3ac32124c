import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DomainError } from '@devyard/core/domain-error';
import {
  add,
  computeOnly,
  diskOnly,
  formatBytes,
  formatCpu,
  parseBytes,
  parseCpu,
  shortfall,
  subtract,
  ZERO,
  type Resources,
} from '@devyard/core/resources';

const KiB = 1024;
const MiB = 1024 ** 2;
const GiB = 1024 ** 3;

/** Runs `fn`, expects a DomainError `invalid-input` that names `field`, and returns it. */
function expectInvalid(fn: () => unknown, field: string): DomainError {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(DomainError);
  const err = caught as DomainError;
  expect(err.code).toBe('invalid-input');
  expect(err.details.field).toBe(field);
  expect(err.message).toContain(field);
  return err;
}

describe('parseBytes', () => {
  it.each([
    ['512MiB', 512 * MiB],
    ['1GiB', GiB],
    ['1gib', GiB],
    ['1Gi', GiB],
    ['2G', 2e9],
    ['2GB', 2e9],
    ['3k', 3000],
    ['3Ki', 3 * KiB],
    ['1TiB', 1024 ** 4],
    ['1T', 1e12],
    ['1073741824', GiB],
    ['100B', 100],
    ['  512 MiB  ', 512 * MiB],
    ['1.5GiB', 1.5 * GiB],
    ['0.5KiB', 512],
  ])('parses %j', (input, bytes) => {
    expect(parseBytes(input)).toBe(bytes);
  });

  it('accepts positive whole numbers as bytes', () => {
    expect(parseBytes(4096)).toBe(4096);
    expect(parseBytes(1)).toBe(1);
  });

  it('rounds fractional results to whole bytes', () => {
    expect(parseBytes('1.5k')).toBe(1500);
    expect(parseBytes('0.001KiB')).toBe(1);
  });

  it.each(['', 'abc', '12XB', '-1GiB', '1,5GiB', 'GiB', '1e9', '1 2GiB', '1.GiB', '.5GiB'])(
    'refuses the malformed size %j with invalid-input naming the field',
    (input) => {
      const err = expectInvalid(() => parseBytes(input, 'disk'), 'disk');
      expect(err.details.value).toBe(input);
    },
  );

  it.each(['0', '0GiB', '0.0001'])('refuses the zero size %j', (input) => {
    expectInvalid(() => parseBytes(input), 'memory');
  });

  it.each([0, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY])('refuses the number %d', (input) => {
    expectInvalid(() => parseBytes(input, 'memory'), 'memory');
  });

  it('defaults the field name to memory', () => {
    expectInvalid(() => parseBytes('lots'), 'memory');
  });

  // A 400-digit size becomes Infinity: it must not pass as a valid amount (JSON.parse('1e400') is
  // Infinity too, so a client can send it).
  it('refuses sizes too large to be an exact number of bytes', () => {
    expectInvalid(() => parseBytes('9'.repeat(400)), 'memory');
    expectInvalid(() => parseBytes('99999999999TiB'), 'memory');
  });
});

describe('parseCpu', () => {
  it.each<[string | number, number]>([
    ['2', 2000],
    ['0.5', 500],
    ['500m', 500],
    ['1500m', 1500],
    ['10m', 10],
    ['0.01', 10],
    [' 4 ', 4000],
    [1.5, 1500],
    [2, 2000],
    [0.25, 250],
    ['2.0005', 2001],
  ])('parses %j', (input, millis) => {
    expect(parseCpu(input)).toBe(millis);
  });

  it.each(['', 'two', '2 cores', '500M', '-1', '1e3', '2 m', '500mm', '.5'])(
    'refuses the malformed amount %j with invalid-input naming the field',
    (input) => {
      const err = expectInvalid(() => parseCpu(input, 'spec.cpu'), 'spec.cpu');
      expect(err.details.value).toBe(input);
    },
  );

  it.each<string | number>(['0', '9m', '0.009', 0, 0.001, -1, Number.NaN])('refuses %j as below 10m', (input) => {
    expectInvalid(() => parseCpu(input), 'cpu');
  });

  it('refuses infinite or unrepresentable amounts', () => {
    expectInvalid(() => parseCpu(Number.POSITIVE_INFINITY), 'cpu');
    expectInvalid(() => parseCpu('9'.repeat(400)), 'cpu');
  });
});

describe('formatting', () => {
  it.each([
    [0, '0B'],
    [1, '1B'],
    [1023, '1023B'],
    [1024, '1KiB'],
    [1536, '1.5KiB'],
    [512 * MiB, '512MiB'],
    [GiB, '1GiB'],
    [2.5 * GiB, '2.5GiB'],
    [1024 ** 4, '1TiB'],
    [2048 * 1024 ** 4, '2048TiB'],
  ])('formatBytes(%d) is %j', (bytes, text) => {
    expect(formatBytes(bytes)).toBe(text);
  });

  it.each([
    [1000, '1'],
    [2000, '2'],
    [500, '500m'],
    [1500, '1500m'],
    [10, '10m'],
  ])('formatCpu(%d) is %j', (millis, text) => {
    expect(formatCpu(millis)).toBe(text);
  });

  it('formatCpu output parses back to the same millicores', () => {
    fc.assert(
      fc.property(fc.integer({ min: 10, max: 1_000_000 }), (millis) => {
        expect(parseCpu(formatCpu(millis))).toBe(millis);
      }),
    );
  });

  it('formatBytes output of whole binary units parses back exactly', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 1023 }), fc.constantFrom(1, KiB, MiB, GiB), (n, unit) => {
        expect(parseBytes(formatBytes(n * unit))).toBe(n * unit);
      }),
    );
  });
});

describe('arithmetic', () => {
  const a: Resources = { cpuMillis: 2000, memoryBytes: 4 * GiB, diskBytes: 10 * GiB };
  const b: Resources = { cpuMillis: 500, memoryBytes: GiB, diskBytes: 20 * GiB };

  it('adds per dimension', () => {
    expect(add(a, b)).toEqual({ cpuMillis: 2500, memoryBytes: 5 * GiB, diskBytes: 30 * GiB });
    expect(add(a, ZERO)).toEqual(a);
  });

  it('subtracts per dimension and floors at zero', () => {
    expect(subtract(a, b)).toEqual({ cpuMillis: 1500, memoryBytes: 3 * GiB, diskBytes: 0 });
    expect(subtract(ZERO, a)).toEqual(ZERO);
  });

  it('does not mutate its arguments and ZERO is frozen', () => {
    const copy = { ...a };
    add(a, b);
    subtract(a, b);
    expect(a).toEqual(copy);
    expect(Object.isFrozen(ZERO)).toBe(true);
  });

  it('splits a request into compute and disk that add back up', () => {
    expect(computeOnly(a)).toEqual({ cpuMillis: 2000, memoryBytes: 4 * GiB, diskBytes: 0 });
    expect(diskOnly(a)).toEqual({ cpuMillis: 0, memoryBytes: 0, diskBytes: 10 * GiB });
    expect(add(computeOnly(a), diskOnly(a))).toEqual(a);
  });

  it('add then subtract is the identity (property)', () => {
    const res = fc.record({
      cpuMillis: fc.nat(1_000_000),
      memoryBytes: fc.nat(2 ** 40),
      diskBytes: fc.nat(2 ** 44),
    });
    fc.assert(
      fc.property(res, res, (x, y) => {
        expect(subtract(add(x, y), y)).toEqual(x);
      }),
    );
  });

  it('shortfall names exactly the dimensions that do not fit into capacity − allocated', () => {
    const capacity: Resources = { cpuMillis: 4000, memoryBytes: 8 * GiB, diskBytes: 100 * GiB };
    const allocated: Resources = { cpuMillis: 3000, memoryBytes: 2 * GiB, diskBytes: 95 * GiB };
    expect(shortfall(capacity, allocated, { cpuMillis: 1000, memoryBytes: 6 * GiB, diskBytes: 5 * GiB })).toEqual([]);
    expect(shortfall(capacity, allocated, { cpuMillis: 1001, memoryBytes: 6 * GiB, diskBytes: 5 * GiB })).toEqual(['cpuMillis']);
    expect(shortfall(capacity, allocated, { cpuMillis: 1000, memoryBytes: 6 * GiB + 1, diskBytes: 5 * GiB + 1 })).toEqual([
      'memoryBytes',
      'diskBytes',
    ]);
    // Over-allocated nodes have no free room at all, never negative room.
    expect(shortfall(capacity, { ...allocated, cpuMillis: 5000 }, { cpuMillis: 0, memoryBytes: 0, diskBytes: 0 })).toEqual([]);
    expect(shortfall(capacity, { ...allocated, cpuMillis: 5000 }, { cpuMillis: 1, memoryBytes: 0, diskBytes: 0 })).toEqual([
      'cpuMillis',
    ]);
  });
});
