/**
 * The Makefile installs every program that the code, the tests and the benchmarks start: each one
 * a source starts (found by host-program-scan.ts) must come from a package that host-packages.json
 * lists for that part (`runtime` for packages/…/src, plus `test` for tests, plus `bench` for
 * benchmarks), or from a package of priority `required`, which every Debian system has. The owning
 * package is asked of dpkg on this machine, so a program installed here by hand fails as surely as
 * one that is missing.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, readdirSync, readFileSync, realpathSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { scanFile, type ProgramUse } from './host-program-scan.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
type Section = 'runtime' | 'test' | 'bench' | 'optional';
type Entry = { programs: string[]; files?: string[]; why: string };
const manifest = JSON.parse(readFileSync(join(root, 'host-packages.json'), 'utf8')) as Record<Section, Record<string, Entry>>;

/** The part of the tree a source file belongs to: what runs on nodes, the tests, the benchmarks. */
function partOf(file: string): 'runtime' | 'test' | 'bench' {
  if (file.startsWith('bench/')) return 'bench';
  return /^packages\/[^/]+\/src\//.test(file) && !file.endsWith('.test.ts') ? 'runtime' : 'test';
}

/** Which sections of the manifest may provide what a source file starts (what `make` installs for its part). */
function sectionsFor(file: string): Section[] {
  const part = partOf(file);
  return part === 'runtime' ? ['runtime', 'optional'] : ['runtime', part, 'optional'];
}

function tsFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(join(root, dir), { withFileTypes: true })) {
    const rel = join(dir, e.name);
    if (e.isDirectory() && e.name !== 'node_modules' && e.name !== 'dist') out.push(...tsFiles(rel));
    else if (e.isFile() && e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(rel);
  }
  return out;
}

const sourceDirs = ['bench', 'test', ...readdirSync(join(root, 'packages')).flatMap((p) => ['src', 'test'].map((d) => `packages/${p}/${d}`))].filter((d) => {
  try {
    return readdirSync(join(root, d)).length >= 0;
  } catch {
    return false;
  }
});
const files = sourceDirs.flatMap(tsFiles);
const scans = files.map((f) => ({ file: f, ...scanFile(join(root, f)) }));
const uses: ProgramUse[] = scans.flatMap((s) => s.uses.map((u) => ({ ...u, file: relative(root, u.file) })));

/** The program's path on this machine, searching sbin too (the agent runs as root). */
function whichProgram(program: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(':'), '/usr/local/sbin', '/usr/sbin', '/sbin', '/usr/bin', '/bin'];
  for (const d of dirs.filter(Boolean)) {
    try {
      accessSync(join(d, program), constants.X_OK);
      return join(d, program);
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Names dpkg may know a path by (merged /usr: often the one outside /usr). */
function dpkgNames(path: string): string[] {
  const out = new Set<string>();
  for (const p of [path, realpathSync(path)]) {
    out.add(p);
    out.add(p.startsWith('/usr/') ? p.slice(4) : `/usr${p}`);
  }
  return [...out];
}

/** The Debian package owning each path, in one `dpkg -S` (it searches every package's file list). */
function owningPackages(paths: string[]): Map<string, string> {
  const names = paths.map((p) => ({ path: p, names: dpkgNames(p) }));
  // dpkg exits 1 when some name has no owner, and still prints the others.
  const r = spawnSync('dpkg', ['-S', ...new Set(names.flatMap((n) => n.names))], { encoding: 'utf8' });
  const owner = new Map<string, string>();
  for (const line of r.stdout.split('\n')) {
    const m = /^([^:]+?)(?::[a-z0-9]+)?: (\S+)$/.exec(line);
    if (m && !line.startsWith('diversion ')) owner.set(m[2]!, m[1]!.split(', ')[0]!);
  }
  const out = new Map<string, string>();
  for (const n of names) {
    const pkg = n.names.map((x) => owner.get(x)).find((x) => x !== undefined);
    if (pkg) out.set(n.path, pkg);
  }
  return out;
}

const requiredPackages = new Set(
  execFileSync('dpkg-query', ['-W', '-f=${Package} ${Priority}\n'], { encoding: 'utf8' })
    .split('\n')
    .filter((l) => l.endsWith(' required'))
    .map((l) => l.split(' ')[0]!),
);

/** Manifest entry that declares `program`, by section. */
function declaredIn(program: string): Array<{ section: Section; pkg: string }> {
  const out: Array<{ section: Section; pkg: string }> = [];
  for (const section of Object.keys(manifest).filter((k) => !k.startsWith('$')) as Section[]) {
    for (const [pkg, e] of Object.entries(manifest[section])) if (e.programs.includes(program)) out.push({ section, pkg });
  }
  return out;
}

describe('host packages', () => {
  it('names the program of every call that starts one', () => {
    const unresolved = scans.flatMap((s) => s.unresolved.map((u) => `${relative(root, u.file)}:${u.line}: ${u.text}`));
    // Such a call needs a `// host-programs: NAME…` (or `none: reason`) comment on the line before it.
    expect(unresolved).toEqual([]);
  });

  it('finds the programs of the code (a scan that finds nothing proves nothing)', () => {
    const found = new Set(uses.map((u) => u.program));
    for (const p of ['crun', 'ip', 'nft', 'getfattr', 'qemu-system-x86_64', 'zstd', 'git', 'debootstrap', 'docker-registry', 'chromium']) expect(found).toContain(p);
  });

  it('every program started comes from a package the Makefile installs for that part, or from one every Debian system has', () => {
    const problems: string[] = [];
    const undeclared = uses.filter((u) => declaredIn(u.program).length === 0);
    const paths = new Map(undeclared.map((u) => [u.program, whichProgram(u.program)]));
    const owners = owningPackages([...paths.values()].filter((p): p is string => p !== undefined));
    for (const u of uses) {
      const allowed = sectionsFor(u.file);
      const where = `${u.program} (${u.file}:${u.line})`;
      const declared = declaredIn(u.program);
      if (declared.some((d) => allowed.includes(d.section))) continue;
      if (declared.length > 0) {
        problems.push(`${where}: listed under ${declared.map((d) => `${d.section}.${d.pkg}`).join(', ')} in host-packages.json, which this part does not install (${allowed.join(', ')})`);
        continue;
      }
      const path = paths.get(u.program);
      const pkg = path ? owners.get(path) : undefined;
      if (pkg && requiredPackages.has(pkg)) continue;
      const why = path ? `from Debian package ${pkg ?? '(none: installed by hand?)'}` : 'not installed';
      problems.push(`${where}: ${why}, and host-packages.json does not list it under ${allowed.filter((s) => s !== 'optional').join(' or ')}`);
    }
    expect(problems).toEqual([]);
  });

  it("each entry's programs and files belong to that Debian package", () => {
    const problems: string[] = [];
    const entries = (['runtime', 'test', 'bench', 'optional'] as const).flatMap((section) => Object.entries(manifest[section]).map(([pkg, e]) => ({ section, pkg, e })));
    const programPaths = new Map(entries.flatMap(({ e }) => e.programs).map((p) => [p, whichProgram(p)]));
    const owners = owningPackages([...[...programPaths.values()].filter((p): p is string => p !== undefined), ...entries.flatMap(({ e }) => e.files ?? []).filter((f) => existsSync(f))]);
    for (const { section, pkg, e } of entries) {
      // make test installs runtime and test packages; the others are checked where present.
      const required = section === 'runtime' || section === 'test';
      for (const program of e.programs) {
        const path = programPaths.get(program);
        if (!path) {
          if (required) problems.push(`${section}.${pkg}: ${program} is not installed`);
          continue;
        }
        const owner = owners.get(path);
        if (owner !== pkg) problems.push(`${section}.${pkg}: ${program} (${path}) belongs to ${owner ?? 'no package'}`);
      }
      for (const file of e.files ?? []) {
        const owner = owners.get(file);
        if (owner !== pkg && (required || existsSync(file))) problems.push(`${section}.${pkg}: ${file} belongs to ${owner ?? 'no package'}`);
      }
    }
    expect(problems).toEqual([]);
  });

  it('lists no package that its part does not use', () => {
    const text = files.map((f) => readFileSync(join(root, f), 'utf8')).join('\n');
    const unused: string[] = [];
    for (const section of ['runtime', 'test', 'bench', 'optional'] as const) {
      // A section's packages must serve its own part: runtime packages the code that runs on nodes.
      const started = new Set(uses.filter((u) => section === 'optional' || partOf(u.file) === section).map((u) => u.program));
      for (const [pkg, e] of Object.entries(manifest[section])) {
        const files = e.files ?? [];
        // Packages that provide neither (CA certificates, libc headers) say why they are needed.
        if (e.programs.length === 0 && files.length === 0) {
          if (e.why.length < 10) unused.push(`${section}.${pkg}: says nothing of why`);
          continue;
        }
        if (!e.programs.some((p) => started.has(p)) && !files.some((f) => text.includes(`'${f}'`))) unused.push(`${section}.${pkg}`);
        // Every program named is started somewhere, or the entry is out of date.
        for (const p of e.programs) if (!uses.some((u) => u.program === p)) unused.push(`${section}.${pkg}: ${p}`);
      }
    }
    expect(unused).toEqual([]);
  });

  it('README names every package that make up and make test install', () => {
    const readme = readFileSync(join(root, 'README.md'), 'utf8');
    const missing = [...Object.keys(manifest.runtime), ...Object.keys(manifest.test)].filter((p) => !new RegExp(`\\b${p.replace(/[.+]/g, '\\$&')}\\b`).test(readme));
    expect(missing).toEqual([]);
  });
});
