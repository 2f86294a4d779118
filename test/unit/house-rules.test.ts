import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

/*
 * The house rules of docs/architecture.md, read from the sources themselves so they cannot rot:
 * src/shared imports nothing above it, src/coordinator and src/node never import each other, no
 * import cycles, no source file over 500 lines, no function over 80 lines.
 */

const ROOT = resolve(new URL('../..', import.meta.url).pathname);
const MAX_FILE_LINES = 500;
const MAX_FUNCTION_LINES = 80;

function tsFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...tsFiles(p));
    else if (/\.(ts|mts)$/.test(name) && !name.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

const sources = ['src', 'test', 'bench'].flatMap((d) => tsFiles(join(ROOT, d)));
const parsed = new Map(sources.map((f) => [f, ts.createSourceFile(f, readFileSync(f, 'utf8'), ts.ScriptTarget.Latest, true)]));
const rel = (f: string) => relative(ROOT, f);

/** Relative imports (static, dynamic and type-only) of one file, resolved to absolute paths. */
function importsOf(sf: ts.SourceFile): string[] {
  const out: string[] = [];
  const visit = (n: ts.Node) => {
    let spec: string | undefined;
    if ((ts.isImportDeclaration(n) || ts.isExportDeclaration(n)) && n.moduleSpecifier && ts.isStringLiteral(n.moduleSpecifier)) spec = n.moduleSpecifier.text;
    else if (ts.isCallExpression(n) && n.expression.kind === ts.SyntaxKind.ImportKeyword && n.arguments[0] && ts.isStringLiteral(n.arguments[0])) spec = n.arguments[0].text;
    else if (ts.isImportTypeNode(n) && ts.isLiteralTypeNode(n.argument) && ts.isStringLiteral(n.argument.literal)) spec = n.argument.literal.text;
    if (spec?.startsWith('.')) out.push(resolve(dirname(sf.fileName), spec));
    ts.forEachChild(n, visit);
  };
  visit(sf);
  return out;
}

const srcFiles = sources.filter((f) => rel(f).startsWith('src/'));
const graph = new Map(srcFiles.map((f) => [f, importsOf(parsed.get(f)!).filter((t) => t.startsWith(join(ROOT, 'src')))]));

describe('house rules', () => {
  it('src/shared imports nothing above it; src/coordinator and src/node never import each other', () => {
    const bad: string[] = [];
    for (const [from, targets] of graph) {
      const f = rel(from);
      for (const t of targets.map(rel)) {
        if (f.startsWith('src/shared/') && !t.startsWith('src/shared/')) bad.push(`${f} → ${t}`);
        if (f.startsWith('src/coordinator/') && t.startsWith('src/node/')) bad.push(`${f} → ${t}`);
        if (f.startsWith('src/node/') && t.startsWith('src/coordinator/')) bad.push(`${f} → ${t}`);
      }
    }
    expect(bad).toEqual([]);
  });

  it('has no import cycles in src', () => {
    const cycles: string[] = [];
    const state = new Map<string, 'open' | 'done'>();
    const stack: string[] = [];
    const walk = (f: string) => {
      state.set(f, 'open');
      stack.push(f);
      for (const t of graph.get(f) ?? []) {
        if (state.get(t) === 'open') cycles.push([...stack.slice(stack.indexOf(t)), t].map(rel).join(' → '));
        else if (!state.has(t) && graph.has(t)) walk(t);
      }
      stack.pop();
      state.set(f, 'done');
    };
    for (const f of graph.keys()) if (!state.has(f)) walk(f);
    expect(cycles).toEqual([]);
  });

  it(`no source, test or bench file is over ${MAX_FILE_LINES} lines`, () => {
    const long = sources.map((f) => [rel(f), readFileSync(f, 'utf8').split('\n').length] as const).filter(([, n]) => n > MAX_FILE_LINES);
    expect(long).toEqual([]);
  });

  it(`no function in src or bench is over ${MAX_FUNCTION_LINES} lines`, () => {
    const long: string[] = [];
    for (const f of sources.filter((s) => !rel(s).startsWith('test/'))) {
      const sf = parsed.get(f)!;
      const visit = (n: ts.Node) => {
        if (ts.isFunctionLike(n) && 'body' in n && n.body) {
          const body = n.body as ts.Node;
          const a = sf.getLineAndCharacterOfPosition(body.getStart(sf)).line;
          const b = sf.getLineAndCharacterOfPosition(body.getEnd()).line;
          if (b - a + 1 > MAX_FUNCTION_LINES) {
            const name = (n as ts.FunctionDeclaration).name?.getText(sf) ?? '<anonymous>';
            long.push(`${rel(f)}:${a + 1} ${name} (${b - a + 1} lines)`);
          }
        }
        ts.forEachChild(n, visit);
      };
      visit(sf);
    }
    expect(long).toEqual([]);
  });

  it('the checks see real files (a broken walk would pass everything)', () => {
    expect(srcFiles.length).toBeGreaterThan(100);
    expect([...graph.values()].flat().length).toBeGreaterThan(300);
  });
});
