import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import type { Command } from 'commander';
import { z } from 'zod';
import { UsageError } from '../shared/errors.ts';

/**
 * The config file: defaults for any command's options, so that precedence is
 *
 *   flags  >  environment (ORCHARD_*)  >  config file  >  built-in defaults
 *
 * Commander already ranks flags over environment over defaults; the file's values are installed
 * as the options' defaults before parsing, which slots them in exactly between. Format (JSON):
 *
 *   { "node": { "budget": "24GiB", "name": "studio" },
 *     "coordinator": { "httpPort": 8420, "apiKey": "s3cret" },
 *     "chat": { "url": "http://10.0.0.2:8420" } }
 *
 * Keys are command paths ("coordinator token" for subcommands) and option names in camelCase or
 * as on the command line ("http-port"). Unknown commands or options are refused (a typo in a
 * config file should not be silently ignored). Location: --config FILE, else ORCHARD_CONFIG,
 * else ~/.config/orchard/config.json ($XDG_CONFIG_HOME respected) when it exists.
 */

const value = z.union([z.string(), z.number(), z.boolean(), z.array(z.string())]);
export const configFileSchema = z.record(z.string(), z.record(z.string(), value));
export type ConfigFile = z.infer<typeof configFileSchema>;

export function defaultConfigPath(env: NodeJS.ProcessEnv = process.env, home = homedir()): string {
  return join(env.XDG_CONFIG_HOME || join(home, '.config'), 'orchard', 'config.json');
}

/** --config FILE / --config=FILE from argv, else ORCHARD_CONFIG; `explicit` = must exist. */
export function configPathFrom(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): { path: string; explicit: boolean } {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') break;
    if (a === '--config') {
      const next = argv[i + 1];
      if (!next) throw new UsageError('--config needs a file');
      return { path: next, explicit: true };
    }
    if (a.startsWith('--config=')) return { path: a.slice(9), explicit: true };
  }
  if (env.ORCHARD_CONFIG) return { path: env.ORCHARD_CONFIG, explicit: true };
  return { path: defaultConfigPath(env), explicit: false };
}

export function parseConfigFile(text: string, path: string): ConfigFile {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`config file ${path} is not valid JSON: ${(err as Error).message}`);
  }
  const parsed = configFileSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new UsageError(`config file ${path}: ${issue?.path.join('.') || '(top level)'}: ${issue?.message ?? 'invalid'} (expected {"command": {"option": value}})`);
  }
  return parsed.data;
}

function commandPath(cmd: Command): string {
  const names: string[] = [];
  for (let c: Command | null = cmd; c?.parent; c = c.parent) names.unshift(c.name());
  return names.join(' ');
}

function allCommands(cmd: Command): Command[] {
  return [cmd, ...cmd.commands.flatMap(allCommands)];
}

const camel = (s: string) => s.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

/** Install the file's values as option defaults. Throws UsageError on unknown keys. */
export function applyConfig(program: Command, config: ConfigFile, path: string): void {
  const byPath = new Map(allCommands(program).map((c) => [commandPath(c), c]));
  for (const [cmdName, options] of Object.entries(config)) {
    const cmd = byPath.get(cmdName);
    if (!cmd || cmdName === '') throw new UsageError(`config file ${path}: unknown command "${cmdName}"`);
    for (const [key, v] of Object.entries(options)) {
      const opt = cmd.options.find((o) => o.attributeName() === camel(key));
      if (!opt) throw new UsageError(`config file ${path}: "${cmdName}" has no option "${key}" (see orchard ${cmdName} --help)`);
      if (opt.negate) {
        // "--no-mdns" style: {"mdns": false} in the file.
        if (typeof v !== 'boolean') throw new UsageError(`config file ${path}: ${cmdName}.${key} must be true or false`);
        cmd.setOptionValueWithSource(opt.attributeName(), v, 'config');
        continue;
      }
      // Options parse strings (sizes, ports): give them strings, as if typed. Source "config"
      // ranks below env and flags in commander (which overwrite default/config/env values).
      const s = typeof v === 'number' ? String(v) : v;
      opt.default(s);
      cmd.setOptionValueWithSource(opt.attributeName(), s, 'config');
    }
  }
}

/** Read the config file (if any) and apply it. */
export async function loadConfig(program: Command, argv: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  const { path, explicit } = configPathFrom(argv, env);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (!explicit && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new UsageError(`cannot read config file ${path}: ${(err as Error).message}`);
  }
  applyConfig(program, parseConfigFile(text, path), path);
  return path;
}
