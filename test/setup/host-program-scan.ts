/**
 * Finds the host programs that TypeScript sources start, by reading their syntax trees: calls of
 * `node:child_process` functions (also promisified), of `runHostCommand`/`runHostCommandRaw`, and
 * of local wrappers that pass one of their parameters on as the program; the first word of `sh -c`
 * / `bash -c` scripts; what `nsenter`/`unshare … --` and `ip netns exec` run; and Playwright's
 * `executablePath`. A call whose program is not a literal (nor a local constant) is reported as
 * unresolved, unless the line before it says which programs it starts:
 *   // host-programs: crun        (or `none`, with a reason after it)
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import ts from 'typescript';

/** One program a source starts. */
export interface ProgramUse {
  program: string;
  file: string;
  line: number;
}

/** A call that starts something the scan cannot name. */
export interface UnresolvedCall {
  file: string;
  line: number;
  text: string;
}

const CHILD_PROCESS_RUNNERS = new Set(['spawn', 'spawnSync', 'execFile', 'execFileSync', 'exec', 'execSync']);
const HOST_COMMAND_RUNNERS = new Set(['runHostCommand', 'runHostCommandRaw']);
const SHELLS = new Set(['sh', 'bash']);
/** Programs that run the program named after `--`. */
const WRAPPERS = new Set(['nsenter', 'unshare', 'setsid', 'env']);
/** Words that come before the program of a simple command. */
const SHELL_PREFIXES = new Set(['if', 'then', 'else', 'elif', 'do', 'while', 'until', '!', '{', 'exec', 'time']);
/** Shell keywords and built-ins: a command that starts with one runs no program. */
const SHELL_BUILTINS = new Set([
  'fi', 'done', 'for', 'in', 'case', 'esac', '}', 'set', 'cd', 'echo', 'read', 'test', '[', 'true', 'false', 'exit', 'export', 'local',
  'shift', 'printf', 'trap', 'wait', 'command', ':', '.', 'return', 'umask', 'ulimit', 'kill', 'break', 'continue', 'eval', 'unset',
]);

/** The programs a shell script starts (the first word of each simple command). */
export function scriptPrograms(script: string): string[] {
  const out: string[] = [];
  const withoutComments = script.replace(/(^|\s)#[^\n]*/g, '$1');
  for (const segment of withoutComments.split(/\|\||&&|\$\(|[|;&\n()`]/)) {
    const words = segment.trim().split(/\s+/).filter(Boolean);
    while (words.length > 0 && (/^[A-Za-z_][A-Za-z0-9_]*=/.test(words[0]!) || SHELL_PREFIXES.has(words[0]!) || /^\d*[<>]/.test(words[0]!))) words.shift();
    const first = words[0];
    if (!first || SHELL_BUILTINS.has(first) || /[$"'<>=]/.test(first) || first.startsWith('-')) continue;
    out.push(basename(first));
  }
  return out;
}

/** Scans one TypeScript file. */
export function scanFile(file: string, text = readFileSync(file, 'utf8')): { uses: ProgramUse[]; unresolved: UnresolvedCall[] } {
  const sf = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
  const uses: ProgramUse[] = [];
  const unresolved: UnresolvedCall[] = [];
  const lineOf = (n: ts.Node) => sf.getLineAndCharacterOfPosition(n.getStart(sf)).line + 1;
  const lines = text.split('\n');
  /** Programs declared by a `// host-programs:` comment on the line before (or at the end of) the call's line. */
  const declared = (line: number): string[] | undefined => {
    for (const l of [lines[line - 2] ?? '', lines[line - 1] ?? '']) {
      const m = /\/\/\s*host-programs:\s*(.*)$/.exec(l);
      if (m) return m[1]!.trim().startsWith('none') ? [] : m[1]!.trim().split(/[\s,]+/).filter(Boolean);
    }
    return undefined;
  };

  // String constants of the file: `const X = 'literal'`.
  const constants = new Map<string, string>();
  /** Array constants of the file: `const argv = ['prog', …]`. */
  const arrays = new Map<string, ts.ArrayLiteralExpression>();
  const visitConsts = (n: ts.Node) => {
    if (ts.isVariableDeclaration(n) && ts.isIdentifier(n.name) && n.initializer && ts.isVariableDeclarationList(n.parent) && n.parent.flags & ts.NodeFlags.Const) {
      if (ts.isStringLiteralLike(n.initializer)) constants.set(n.name.text, n.initializer.text);
      if (ts.isArrayLiteralExpression(n.initializer)) arrays.set(n.name.text, n.initializer);
    }
    ts.forEachChild(n, visitConsts);
  };
  visitConsts(sf);
  const stringOf = (e: ts.Expression | undefined): string | undefined => {
    if (!e) return undefined;
    while (ts.isNonNullExpression(e) || ts.isParenthesizedExpression(e) || ts.isAsExpression(e)) e = e.expression;
    if (ts.isStringLiteralLike(e)) return e.text;
    if (ts.isIdentifier(e)) return constants.get(e.text);
    return undefined;
  };

  // Runners: child_process imports, runHostCommand*, `promisify(runner)`, then local wrappers.
  const runners = new Set<string>();
  /** Runners whose first argument is a shell command line (`exec`, `execSync`). */
  const shellRunners = new Set<string>();
  for (const st of sf.statements) {
    if (!ts.isImportDeclaration(st) || !st.importClause?.namedBindings || !ts.isNamedImports(st.importClause.namedBindings)) continue;
    const from = (st.moduleSpecifier as ts.StringLiteral).text;
    for (const el of st.importClause.namedBindings.elements) {
      if (el.isTypeOnly) continue;
      const imported = (el.propertyName ?? el.name).text;
      if ((from === 'node:child_process' || from === 'child_process') && CHILD_PROCESS_RUNNERS.has(imported)) {
        runners.add(el.name.text);
        if (imported === 'exec' || imported === 'execSync') shellRunners.add(el.name.text);
      }
      if (HOST_COMMAND_RUNNERS.has(imported)) runners.add(el.name.text);
    }
  }
  if (sf.fileName.endsWith('host-command-runner.ts')) for (const r of HOST_COMMAND_RUNNERS) runners.add(r);
  const visitPromisify = (n: ts.Node) => {
    if (ts.isVariableDeclaration(n) && ts.isIdentifier(n.name) && n.initializer && ts.isCallExpression(n.initializer)) {
      const c = n.initializer;
      if (ts.isIdentifier(c.expression) && c.expression.text === 'promisify' && c.arguments[0] && ts.isIdentifier(c.arguments[0]) && runners.has(c.arguments[0].text)) {
        runners.add(n.name.text);
      }
    }
    ts.forEachChild(n, visitPromisify);
  };
  visitPromisify(sf);

  const calleeName = (c: ts.CallExpression): string | undefined => (ts.isIdentifier(c.expression) ? c.expression.text : undefined);
  /** The expression naming the program of a runner call: the first argument, or its array's first element. */
  const programExpr = (c: ts.CallExpression): { expr: ts.Expression | undefined; args: readonly ts.Expression[] } => {
    let a0 = c.arguments[0];
    if (a0 && ts.isIdentifier(a0) && arrays.has(a0.text)) a0 = arrays.get(a0.text);
    if (a0 && ts.isArrayLiteralExpression(a0)) return { expr: a0.elements[0], args: a0.elements.slice(1) };
    const a1 = c.arguments[1];
    return { expr: a0, args: a1 && ts.isArrayLiteralExpression(a1) ? a1.elements : [] };
  };
  /** The named function that declares `name` as a parameter, walking out from `n` (wrappers are called by that name). */
  const declaringFunction = (n: ts.Node, name: string): string | undefined => {
    for (let p = n.parent; p; p = p.parent) {
      if (!ts.isFunctionLike(p)) continue;
      // `const [cmd, ...args] = argv`: the program comes from whatever `argv` is.
      const unpacked = unpackedFrom(p, name);
      if (unpacked !== undefined) return declaringFunction(n, unpacked);
      if (!p.parameters.some((q) => ts.isIdentifier(q.name) && q.name.text === name)) continue;
      if (ts.isFunctionDeclaration(p) && p.name) return p.name.text;
      if ((ts.isArrowFunction(p) || ts.isFunctionExpression(p)) && ts.isVariableDeclaration(p.parent) && ts.isIdentifier(p.parent.name)) return p.parent.name.text;
      return undefined;
    }
    return undefined;
  };
  /** The array `name` is destructured from in the body of `fn`, if it is. */
  const unpackedFrom = (fn: ts.SignatureDeclaration, name: string): string | undefined => {
    let found: string | undefined;
    const visit = (n: ts.Node) => {
      if (ts.isVariableDeclaration(n) && ts.isArrayBindingPattern(n.name) && n.initializer && ts.isIdentifier(n.initializer)) {
        if (n.name.elements.some((e) => ts.isBindingElement(e) && ts.isIdentifier(e.name) && e.name.text === name)) found = n.initializer.text;
      }
      if (found === undefined && !(ts.isFunctionLike(n) && n !== fn)) ts.forEachChild(n, visit);
    };
    ts.forEachChild(fn, visit);
    return found;
  };
  /** The identifier an expression names, through `!`, `...`, parentheses and element access. */
  const identifierOf = (expr: ts.Expression | undefined): string | undefined => {
    let e = expr;
    // `argv[0]!` of a wrapper `(...argv) => spawn(argv[0]!, …)` names the parameter too.
    while (e && (ts.isNonNullExpression(e) || ts.isSpreadElement(e) || ts.isParenthesizedExpression(e) || ts.isElementAccessExpression(e))) e = e.expression;
    return e && ts.isIdentifier(e) ? e.text : undefined;
  };
  // Wrappers pass a parameter on as the program; their callers name it. Repeat for wrappers of wrappers.
  const wrappers = new Set<ts.CallExpression>();
  for (let changed = true; changed; ) {
    changed = false;
    const visit = (n: ts.Node) => {
      if (ts.isCallExpression(n) && runners.has(calleeName(n) ?? '') && !wrappers.has(n)) {
        const id = identifierOf(programExpr(n).expr);
        const wrapper = id === undefined ? undefined : declaringFunction(n, id);
        if (wrapper !== undefined) {
          wrappers.add(n);
          runners.add(wrapper);
          changed = true;
        }
      }
      ts.forEachChild(n, visit);
    };
    visit(sf);
  }

  const add = (program: string, line: number) => uses.push({ program: basename(program), file, line });
  /** Records argv's program and what it runs in turn (shell scripts, `--` of wrappers, `ip netns exec`). */
  const addArgv = (argv: Array<string | undefined>, line: number) => {
    const [prog, ...rest] = argv;
    if (!prog) return;
    const name = basename(prog);
    add(name, line);
    if (SHELLS.has(name)) {
      const i = rest.indexOf('-c');
      const script = i >= 0 ? rest[i + 1] : undefined;
      if (script !== undefined) for (const p of scriptPrograms(script)) add(p, line);
    } else if (WRAPPERS.has(name)) {
      const i = rest.indexOf('--');
      if (i >= 0) addArgv(rest.slice(i + 1), line);
    } else if (name === 'ip' && rest[0] === 'netns' && rest[1] === 'exec') {
      addArgv(rest.slice(3), line);
    }
  };

  const visit = (n: ts.Node) => {
    if (ts.isCallExpression(n) && runners.has(calleeName(n) ?? '') && !wrappers.has(n)) {
      const line = lineOf(n);
      const { expr, args } = programExpr(n);
      const named = declared(line);
      const prog = stringOf(expr);
      // Node itself (`process.execPath`) is what every part of Devyard runs on.
      const isNode = expr !== undefined && expr.getText(sf) === 'process.execPath';
      if (isNode) {
        // nothing to install
      } else if (named) for (const p of named) add(p, line);
      else if (prog !== undefined && shellRunners.has(calleeName(n)!)) for (const p of scriptPrograms(prog)) add(p, line);
      else if (prog !== undefined) addArgv([prog, ...args.map((a) => stringOf(a))], line);
      else unresolved.push({ file, line, text: n.getText(sf).split('\n')[0]!.slice(0, 120) });
    }
    if (ts.isPropertyAssignment(n) && ts.isIdentifier(n.name) && n.name.text === 'executablePath') {
      const p = stringOf(n.initializer);
      if (p !== undefined) add(p, lineOf(n));
    }
    ts.forEachChild(n, visit);
  };
  visit(sf);
  return { uses, unresolved };
}
