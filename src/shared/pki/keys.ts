import { webcrypto } from 'node:crypto';
import { x509 } from './x509.ts';

/**
 * Cluster keys are ECDSA P-256 from Node's own crypto (its WebCrypto face, which is what
 * @peculiar/x509 signs with). Private keys leave this module only as PKCS#8 PEM for a 0600 file
 * and for Node's TLS, which reads the same PEM.
 */
export const EC_KEY = { name: 'ECDSA', namedCurve: 'P-256' } as const;
export const SIGNING = { name: 'ECDSA', hash: 'SHA-256' } as const;

export async function generateKeyPair(): Promise<CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(EC_KEY, true, ['sign', 'verify'])) as CryptoKeyPair;
}

export async function privateKeyPem(key: CryptoKey): Promise<string> {
  const der = await webcrypto.subtle.exportKey('pkcs8', key as webcrypto.CryptoKey);
  return x509.PemConverter.encode(der, 'PRIVATE KEY');
}

/** The key pair back from its PKCS#8 PEM (the public half is derived, not stored separately). */
export async function keyPairFromPem(pem: string): Promise<CryptoKeyPair> {
  const der = x509.PemConverter.decodeFirst(pem);
  const privateKey = (await webcrypto.subtle.importKey('pkcs8', der, EC_KEY, true, ['sign'])) as CryptoKey;
  const jwk = await webcrypto.subtle.exportKey('jwk', privateKey as webcrypto.CryptoKey);
  const { d: _d, key_ops: _ops, ...pub } = jwk;
  const publicKey = (await webcrypto.subtle.importKey('jwk', pub, EC_KEY, true, ['verify'])) as CryptoKey;
  return { privateKey, publicKey };
}
