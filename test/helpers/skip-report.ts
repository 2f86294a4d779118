import { relative } from 'node:path';
import type { Reporter, TestCase, TestModule, TestSuite, Vitest } from 'vitest/node';

/**
 * A reporter that says what did not run: at the end of the run one line per skip reason (the
 * reason describeWith / itWith recorded, or ctx.skip's note), with the files and how many tests.
 * With CI=true a skipped test under test/integration fails the run (exit code 1): CI installs
 * everything those tests need, so a skip there means a broken machine set-up, not a pass.
 */
export default class SkipReport implements Reporter {
  private root = process.cwd();
  private log: (msg: string) => void = (msg) => process.stderr.write(`${msg}\n`);

  onInit(vitest: Vitest): void {
    this.root = vitest.config.root;
    this.log = (msg) => vitest.logger.log(msg);
  }

  onTestRunEnd(testModules: ReadonlyArray<TestModule>): void {
    const byReason = new Map<string, { files: Set<string>; tests: number; integration: number }>();
    for (const module of testModules) {
      const file = relative(this.root, module.moduleId);
      for (const test of module.children.allTests()) {
        if (test.result().state !== 'skipped') continue;
        const reason = skipReason(test);
        const entry = byReason.get(reason) ?? { files: new Set(), tests: 0, integration: 0 };
        entry.files.add(file);
        entry.tests += 1;
        // Red-team tests (test/security/) run real processes like integration tests: a skip there fails CI too.
        if (file.startsWith('test/integration/') || file.startsWith('test/security/')) entry.integration += 1;
        byReason.set(reason, entry);
      }
    }
    if (byReason.size === 0) return;
    const ci = process.env.CI === 'true' || process.env.CI === '1';
    const failing = ci && [...byReason.values()].some((e) => e.integration > 0);
    this.log('');
    this.log(failing ? 'Skipped tests (CI=true: a skipped integration test fails the run):' : 'Skipped tests:');
    for (const [reason, e] of byReason) this.log(`  skipped ${e.tests} in ${[...e.files].join(', ')}: ${reason}`);
    if (failing) process.exitCode = 1;
  }
}

/** The recorded reason of the test or of the nearest suite around it. */
function skipReason(test: TestCase): string {
  const result = test.result();
  if (result.state === 'skipped' && result.note) return result.note;
  let task: TestCase | TestSuite | TestModule | undefined = test;
  while (task) {
    const r = task.meta().skipReason;
    if (r) return r;
    // A failed beforeAll leaves its tests skipped; the failure itself is reported above.
    if (task.type !== 'test' && task.state() === 'failed') return 'did not run: a hook of its suite failed (see the errors above)';
    task = task.type === 'module' ? undefined : task.parent;
  }
  return 'no reason recorded (a bare .skip / .skipIf: use describeWith / itWith from test/helpers/needs.ts)';
}
