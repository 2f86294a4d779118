import { Command, Option } from 'commander';
import { describe, expect, it } from 'vitest';
import { applyConfig, configPathFrom, defaultConfigPath, parseConfigFile } from '../../src/cli/config.ts';
import { buildProgram } from '../../src/cli/program.ts';
import { UsageError } from '../../src/shared/errors.ts';

function program(): { root: Command; seen: () => Record<string, unknown> } {
  let opts: Record<string, unknown> = {};
  const root = new Command('orchard').exitOverride();
  root
    .command('node')
    .exitOverride()
    .addOption(new Option('--budget <size>', 'b').env('T_ORCHARD_BUDGET'))
    .addOption(new Option('--grpc-port <port>', 'p').default('50151').env('T_ORCHARD_PORT'))
    .option('--no-mdns', 'm')
    .action((o: Record<string, unknown>) => {
      opts = o;
    });
  return { root, seen: () => opts };
}

async function run(config: unknown, argv: string[], env: Record<string, string> = {}) {
  const saved = { ...process.env };
  Object.assign(process.env, env);
  try {
    const p = program();
    if (config) applyConfig(p.root, parseConfigFile(JSON.stringify(config), 'c.json'), 'c.json');
    await p.root.parseAsync(argv, { from: 'user' });
    return p.seen();
  } finally {
    for (const k of Object.keys(env)) delete process.env[k];
    Object.assign(process.env, saved);
  }
}

describe('config precedence: flags > env > file > defaults', () => {
  it('defaults when nothing is given', async () => {
    expect(await run(undefined, ['node'])).toEqual({ grpcPort: '50151', mdns: true });
  });
  it('the file beats defaults (numbers become the strings a flag would give)', async () => {
    expect(await run({ node: { budget: '8GiB', 'grpc-port': 1234, mdns: false } }, ['node'])).toEqual({ budget: '8GiB', grpcPort: '1234', mdns: false });
  });
  it('env beats the file', async () => {
    expect(await run({ node: { grpcPort: 1234 } }, ['node'], { T_ORCHARD_PORT: '2222' })).toMatchObject({ grpcPort: '2222' });
  });
  it('flags beat env and the file', async () => {
    expect(await run({ node: { grpcPort: 1234, mdns: true } }, ['node', '--grpc-port', '3333', '--no-mdns'], { T_ORCHARD_PORT: '2222' })).toMatchObject({ grpcPort: '3333', mdns: false });
  });
});

describe('config file errors', () => {
  const apply = (c: unknown) => () => applyConfig(program().root, parseConfigFile(JSON.stringify(c), 'c.json'), 'c.json');
  it.each([
    [{ nope: {} }, /unknown command "nope"/],
    [{ node: { budgit: '1G' } }, /"node" has no option "budgit"/],
    [{ node: { mdns: 'no' } }, /node\.mdns must be true or false/],
    [{ node: { budget: { x: 1 } } }, /node\.budget/],
    [[1], /top level/],
  ])('%j is refused', (c, re) => {
    expect(apply(c)).toThrow(UsageError);
    expect(apply(c)).toThrow(re);
  });
  it('bad JSON names the file', () => {
    expect(() => parseConfigFile('{', '/x/config.json')).toThrow(/config file \/x\/config.json is not valid JSON/);
  });
  it('knows the real commands and their options', async () => {
    const p = await buildProgram();
    expect(() => applyConfig(p, { coordinator: { httpPort: 9000, apiKey: 'k' }, node: { budget: '1GiB', mdns: false }, 'coordinator token': { stateDir: '/s' } }, 'c')).not.toThrow();
  });
});

describe('config location', () => {
  it('--config, --config=, ORCHARD_CONFIG, else the XDG default (optional)', () => {
    expect(configPathFrom(['node', '--config', '/a.json'], {})).toEqual({ path: '/a.json', explicit: true });
    expect(configPathFrom(['--config=/b.json'], {})).toEqual({ path: '/b.json', explicit: true });
    expect(configPathFrom(['node', '--', '--config', 'x'], { ORCHARD_CONFIG: '/c.json' })).toEqual({ path: '/c.json', explicit: true });
    expect(configPathFrom([], {})).toEqual({ path: defaultConfigPath({}), explicit: false });
    expect(defaultConfigPath({ XDG_CONFIG_HOME: '/xdg' })).toBe('/xdg/orchard/config.json');
    expect(defaultConfigPath({}, '/home/u')).toBe('/home/u/.config/orchard/config.json');
  });
});

/** Every command below the root, with its path (`['coordinator', 'token']`). */
function commandsOf(root: Command): { cmd: Command; path: string[] }[] {
  const out: { cmd: Command; path: string[] }[] = [];
  const walk = (c: Command, path: string[]) => {
    for (const sub of c.commands) {
      out.push({ cmd: sub, path: [...path, sub.name()] });
      walk(sub, [...path, sub.name()]);
    }
  };
  walk(root, []);
  return out;
}

/** A value the option accepts from the environment: its first choice, else a number as text. */
function sampleValue(o: Option): string {
  return o.argChoices?.[0] ?? '7';
}

/**
 * Parse `orchard <path>` with `env` set and the command's action replaced by a recorder (so
 * nothing starts); required arguments get placeholders. Returns the options the action saw.
 */
async function optionsFromEnv(path: string[], env: Record<string, string>): Promise<Record<string, unknown>> {
  const program = await buildProgram();
  const target = commandsOf(program).find((c) => c.path.join(' ') === path.join(' '))!.cmd;
  let seen: Record<string, unknown> | undefined;
  target.action((...args: unknown[]) => {
    seen = (args.at(-1) as Command).opts();
  });
  const placeholders = target.registeredArguments.filter((a) => a.required).map(() => 'arg');
  const saved = { ...process.env };
  Object.assign(process.env, env);
  try {
    await program.parseAsync([...path, ...placeholders], { from: 'user' });
  } finally {
    for (const k of Object.keys(env)) delete process.env[k];
    Object.assign(process.env, saved);
  }
  return seen!;
}

// Collected once here: the tests below are generated from the command tree.
const fullProgram = await buildProgram();

describe('every option can come from the environment', () => {
  const program = fullProgram;
  const leaves = commandsOf(program).filter(({ cmd }) => cmd.commands.length === 0);

  it('each option of each command names a variable, and --help shows it', () => {
    let count = 0;
    for (const { cmd, path } of commandsOf(program)) {
      const help = cmd.helpInformation();
      for (const o of cmd.options) {
        count++;
        expect(o.envVar, `orchard ${path.join(' ')} ${o.flags}`).toMatch(/^ORCHARD_[A-Z0-9_]+$/);
        expect(help.replace(/\s+/g, ' '), `orchard ${path.join(' ')} --help`).toMatch(new RegExp(`[(,] ?env: ${o.envVar}\\)`));
      }
    }
    for (const o of program.options) if (o.long !== '--version') expect(o.envVar, o.flags).toBeDefined();
    expect(count).toBeGreaterThanOrEqual(100);
  });

  it('one variable means one option: a name shared by commands is the same flag everywhere', () => {
    // Deliberate: one value under two flag names. The local agent's gRPC port is `node
    // --grpc-port` and `up --agent-port` (up's --grpc-port is the coordinator's).
    const SAME_VALUE: Record<string, readonly string[]> = {
      ORCHARD_NODE_GRPC_PORT: ['--grpc-port', '--agent-port'],
    };
    const byName = new Map<string, string>();
    for (const { cmd } of commandsOf(program)) {
      for (const o of cmd.options) {
        const flag = byName.get(o.envVar!);
        if (flag !== undefined && flag !== o.long) expect(SAME_VALUE[o.envVar!], `${o.envVar}: ${flag} and ${o.long}`).toEqual(expect.arrayContaining([flag, o.long]));
        byName.set(o.envVar!, o.long!);
      }
    }
  });

  it('secrets (API keys, tokens) are read from the environment or the config file, not only argv', async () => {
    const secrets = commandsOf(program).flatMap(({ cmd, path }) => cmd.options.filter((o) => /key|token|secret|password/.test(o.long ?? '')).map((o) => ({ o, path })));
    expect(secrets.length).toBeGreaterThanOrEqual(5);
    for (const { o, path } of secrets) {
      expect(o.envVar, `${path.join(' ')} ${o.long}`).toBeDefined();
      const fresh = await buildProgram();
      expect(() => applyConfig(fresh, { [path.join(' ')]: { [o.attributeName()]: 's3cret' } }, 'c')).not.toThrow();
    }
  });

  it.each(leaves.map(({ path }) => [path.join(' '), path] as const))('orchard %s: setting each variable sets its option', async (_name, path) => {
    const cmd = commandsOf(await buildProgram()).find((c) => c.path.join(' ') === path.join(' '))!.cmd;
    const valued = cmd.options.filter((o) => o.required || o.optional);
    // `--no-nats` beside `--nats <url>` sets the same attribute: set together, one must win, so it is checked alone.
    const pairedOff = cmd.options.filter((o) => o.negate && valued.some((v) => v.attributeName() === o.attributeName()));
    const booleans = cmd.options.filter((o) => !(o.required || o.optional) && !pairedOff.includes(o));
    for (const o of pairedOff) expect((await optionsFromEnv(path, { [o.envVar!]: '1' }))[o.attributeName()], `${o.envVar}=1`).toBe(false);
    const on = await optionsFromEnv(path, Object.fromEntries([...valued.map((o) => [o.envVar!, sampleValue(o)]), ...booleans.map((o) => [o.envVar!, '1'])]));
    for (const o of valued) {
      const expected = o.parseArg ? o.parseArg(sampleValue(o), o.defaultValue) : o.variadic ? [sampleValue(o)] : sampleValue(o);
      expect(on[o.attributeName()], `${o.envVar}=${sampleValue(o)}`).toEqual(expected);
    }
    for (const o of booleans) expect(on[o.attributeName()], `${o.envVar}=1`).toBe(!o.negate);
    if (booleans.length === 0) return;
    // "0" / "false" mean off, although commander alone would treat any value as "set".
    const required = Object.fromEntries(valued.filter((o) => o.mandatory).map((o) => [o.envVar!, sampleValue(o)]));
    const off = await optionsFromEnv(path, { ...required, ...Object.fromEntries(booleans.map((o) => [o.envVar!, 'false'])) });
    for (const o of booleans) expect(off[o.attributeName()] ?? false, `${o.envVar}=false`).toBe(!!o.negate);
  });

  it('the generated name follows the command path and the long flag', () => {
    const find = (path: string, flag: string) => commandsOf(program).find((c) => c.path.join(' ') === path)!.cmd.options.find((o) => o.long === flag)!.envVar;
    expect(find('testmodel gguf', '--kv-heads')).toBe('ORCHARD_TESTMODEL_GGUF_KV_HEADS');
    expect(find('coordinator', '--no-mdns')).toBe('ORCHARD_COORDINATOR_NO_MDNS');
    expect(find('node', '--budget')).toBe('ORCHARD_NODE_BUDGET');
    expect(find('up', '--max-queue')).toBe('ORCHARD_COORDINATOR_MAX_QUEUE');
    expect(find('status', '--coordinator')).toBe('ORCHARD_COORDINATOR');
  });
});
