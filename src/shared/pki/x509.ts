/**
 * The one door to @peculiar/x509. It needs a Reflect metadata polyfill loaded before it (its
 * dependency injection uses tsyringe) and a WebCrypto provider; both are set here, once, so no
 * other module imports the library directly and gets it half-initialised.
 */
import 'reflect-metadata';
import { webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto as unknown as Crypto);

export { x509 };
