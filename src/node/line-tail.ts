/**
 * The last N lines of a byte stream (an engine's stderr), kept so an exit can be explained
 * ("why did the worker die?") without storing unbounded logs. Pure; fed chunk by chunk.
 */
export class LineTail {
  private readonly lines: string[] = [];
  private partial = '';

  constructor(
    private readonly limit = 20,
    // A single line longer than this is cut: engines sometimes print progress bars without newlines.
    private readonly maxLineChars = 2000,
    /** Keep only lines this accepts (decided per complete line, so memory stays bounded by `limit`). */
    private readonly keep: (line: string) => boolean = () => true,
  ) {}

  push(chunk: string): void {
    const parts = (this.partial + chunk).split(/\r?\n|\r/);
    this.partial = parts.pop() ?? '';
    if (this.partial.length > this.maxLineChars) this.partial = this.partial.slice(-this.maxLineChars);
    for (const line of parts) this.add(line);
  }

  /** The kept lines, oldest first, including an unterminated last line. Blank lines are skipped. */
  snapshot(): string[] {
    const all = this.partial.trim() === '' || !this.keep(this.partial) ? [...this.lines] : [...this.lines, this.partial];
    return all.slice(-this.limit);
  }

  private add(line: string): void {
    if (line.trim() === '' || !this.keep(line)) return;
    this.lines.push(line.length > this.maxLineChars ? line.slice(0, this.maxLineChars) : line);
    if (this.lines.length > this.limit) this.lines.shift();
  }
}
