import type { Command } from 'commander';

// Filled in by the foundation work: builds llama.cpp engines with RPC into the per-user cache.
export function registerSetup(program: Command): void {
  program.command('setup').description('build or locate the inference engines (llama.cpp with RPC)');
}
