import type { Command } from 'commander';

// Filled in by the foundation work: deterministic GGUF test models and header-only presets.
export function registerTestmodel(program: Command): void {
  program.command('testmodel').description('write deterministic test models');
}
