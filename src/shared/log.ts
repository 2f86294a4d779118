import pino, { type Logger } from 'pino';
import pretty from 'pino-pretty';

/**
 * Logs go to stderr so stdout stays clean for `--json` output. JSON by default (for launchd,
 * systemd and log shippers); human-readable when stderr is a terminal, or with ORCHARD_LOG_FORMAT=pretty.
 */
export function createLogger(name: string, level = process.env.ORCHARD_LOG_LEVEL ?? 'info'): Logger {
  const format = process.env.ORCHARD_LOG_FORMAT ?? (process.stderr.isTTY ? 'pretty' : 'json');
  if (format === 'pretty') {
    return pino({ name, level }, pretty({ destination: 2, sync: true, colorize: process.stderr.isTTY, ignore: 'pid,hostname' }));
  }
  return pino({ name, level }, pino.destination({ dest: 2, sync: true }));
}

export type { Logger };
