import { runCli } from './program.ts';

const code = await runCli(process.argv.slice(2));
// Exit once stdout has drained (pipes are asynchronous in Node) so `--json` output is never cut.
process.stdout.write('', () => process.exit(code));
