#!/usr/bin/env node
// Entry point for `npx orchard`. Sources are TypeScript run through tsx's loader so a fresh
// clone works after `npm ci` with no build step.
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/main.ts');
