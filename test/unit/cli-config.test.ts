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
  it('knows the real commands and their options', () => {
    const p = buildProgram();
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
