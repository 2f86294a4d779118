import { existsSync } from 'node:fs';
import { type Command, CommanderError, Option } from 'commander';
import { OrchardError, UsageError } from '../shared/errors.ts';
import { configPathFrom, loadConfig } from './config.ts';
import { honourFalseEnv, OrchardCommand } from './env.ts';
type Register = (program: Command) => void;

/**
 * Every command, in help order, by name: `commands/<name>.ts` exports `register<Name>(program)`.
 * The modules are imported on demand because each pulls in its whole stack (coordinator, agent,
 * NATS, build tooling…) and Node loads every static import before the first line runs: every
 * `orchard status` paid ~1.5 s of CPU for all of them, the largest single cost of the tests
 * that drive the CLI as a process.
 */
const COMMANDS: Readonly<Record<string, () => Promise<Register>>> = {
  setup: async () => (await import('./commands/setup.ts')).registerSetup,
  testmodel: async () => (await import('./commands/testmodel.ts')).registerTestmodel,
  service: async () => (await import('./commands/service.ts')).registerService,
  node: async () => (await import('./commands/node.ts')).registerNode,
  coordinator: async () => (await import('./commands/coordinator.ts')).registerCoordinator,
  cluster: async () => (await import('./commands/cluster.ts')).registerCluster,
  status: async () => (await import('./commands/status.ts')).registerStatus,
  events: async () => (await import('./commands/events.ts')).registerEvents,
  load: async () => (await import('./commands/load.ts')).registerLoad,
  unload: async () => (await import('./commands/unload.ts')).registerUnload,
  rebalance: async () => (await import('./commands/rebalance.ts')).registerRebalance,
  generate: async () => (await import('./commands/generate.ts')).registerGenerate,
  plan: async () => (await import('./commands/plan.ts')).registerPlan,
  demo: async () => (await import('./commands/demo.ts')).registerDemo,
  up: async () => (await import('./commands/up.ts')).registerUp,
  chat: async () => (await import('./commands/chat.ts')).registerChat,
};

/**
 * The `orchard` command tree (`only`: just those commands). Each command lives in
 * `commands/<name>.ts`; this file only assembles them and owns the shared conventions:
 * exit 0 ok, 1 failure, 2 usage; one-line errors; stack traces only with --debug.
 */
export async function buildProgram(only: readonly string[] = Object.keys(COMMANDS)): Promise<Command> {
  const program = new OrchardCommand('orchard')
    .description('Run one large language model across several Apple Silicon Macs.')
    .version(process.env.npm_package_version ?? '0.1.0', '-V, --version')
    .addOption(new Option('--debug', 'print stack traces and debug logs').env('ORCHARD_DEBUG'))
    .addOption(new Option('--config <file>', 'config file (default ~/.config/orchard/config.json; precedence: flags > ORCHARD_* env > file > defaults)').env('ORCHARD_CONFIG'))
    .showSuggestionAfterError(true)
    .configureHelp({ sortSubcommands: false })
    .hook('preAction', (_root, actionCommand) => honourFalseEnv(actionCommand));
  program.exitOverride();
  const registers = await Promise.all(Object.keys(COMMANDS).filter((name) => only.includes(name)).map((name) => COMMANDS[name]!()));
  for (const register of registers) register(program);
  for (const cmd of program.commands) inheritConventions(cmd);
  return program;
}

/**
 * The one command a run needs, when that is all it needs: the first word of argv names a command
 * and no config file exists (a config file is checked against every command: an unknown key is
 * refused). Help, typos (suggestions) and config files get the whole tree.
 */
function commandToLoad(argv: readonly string[]): string | undefined {
  let i = 0;
  while (i < argv.length && argv[i]!.startsWith('-')) i += argv[i] === '--config' ? 2 : 1;
  const name = argv[i];
  if (name === undefined || !Object.hasOwn(COMMANDS, name)) return undefined;
  return existsSync(configPathFrom(argv).path) ? undefined : name;
}

function inheritConventions(cmd: Command): void {
  cmd.exitOverride();
  cmd.showSuggestionAfterError(true);
  for (const sub of cmd.commands) inheritConventions(sub);
}

/** Wrap an async action so the CLI conventions hold for every command. */
export function action<A extends unknown[]>(fn: (...args: A) => Promise<void> | void): (...args: A) => Promise<void> {
  return async (...args: A) => {
    await fn(...args);
  };
}

export async function runCli(argv: string[]): Promise<number> {
  const debug = argv.includes('--debug') || !!process.env.ORCHARD_DEBUG;
  try {
    const name = commandToLoad(argv);
    const program = await buildProgram(name === undefined ? undefined : [name]);
    await loadConfig(program, argv);
    await program.parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      // help and version are "errors" to commander; they already printed their text.
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return 0;
      return 2;
    }
    if (err instanceof OrchardError) {
      process.stderr.write(`orchard: ${err.message}\n`);
      if (debug && err.stack) process.stderr.write(`${err.stack}\n`);
      return err.exitCode;
    }
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`orchard: unexpected error: ${message}\n`);
    if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
    else process.stderr.write('orchard: run again with --debug for details\n');
    return 1;
  }
}

export { UsageError };
