/**
 * Host keys the server makes must load in the gateway's SSH server (ssh2). ssh2's own generator
 * writes a malformed pair when an ed25519 public key starts with a zero byte (one in 256), and a
 * stored pair of that kind must be replaced rather than served.
 */
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { hasWholeEd25519Key, isLoadableSshKeyPair, newSshKeyPair, type SshKeyPair } from '@devyard/server/services/ssh-key-pairs';
import { startTestControlPlane, type TestControlPlane } from './test-control-plane.js';

/** A pair as ssh2's generator writes it when the public key starts with a zero byte. */
function malformedPair(): SshKeyPair {
  for (;;) {
    const k = ssh2.utils.generateKeyPairSync('ed25519');
    if (ssh2.utils.parseKey(k.public) instanceof Error) return { privateKey: k.private, publicKey: k.public };
  }
}

describe('SSH key pairs', () => {
  it('every new pair loads, public and private half alike', () => {
    // ssh2's generator alone fails this with a probability of 1 - (255/256)^3000 > 99.99 %.
    const bad = Array.from({ length: 3000 }, () => newSshKeyPair()).filter((k) => !isLoadableSshKeyPair(k));
    expect(bad).toEqual([]);
  });

  it('tells a truncated ed25519 public key from a whole one', () => {
    const broken = malformedPair();
    expect(isLoadableSshKeyPair(broken)).toBe(false);
    expect(hasWholeEd25519Key(broken)).toBe(false);
    expect(hasWholeEd25519Key(newSshKeyPair())).toBe(true);
  });

  describe('stored host keys', () => {
    let t: TestControlPlane;
    let gateway: DevyardClient;
    const endpoint = { url: 'http://127.0.0.1:7100', sshHost: '127.0.0.1', sshPort: 2222, previewDomain: null };

    beforeAll(async () => {
      t = await startTestControlPlane('sshkeys', { cpuMillis: 8000, memoryBytes: 8 * 1024 ** 3 });
      gateway = new DevyardClient({ url: t.cp.url, token: t.cp.tokens.gatewayToken });
      await t.user.createBox({ name: 'keyed', template: 'tiny' });
    });
    afterAll(async () => {
      await t?.close();
    });

    it("replaces a box's and the gateway's malformed stored keys with loadable ones", async () => {
      const box = await t.user.getBox('keyed');
      await gateway.syncGateway({ gatewayId: 'g1', endpoint, activity: [] });
      const broken = malformedPair();
      await t.cp.store.db.updateTable('box_host_keys').set({ private_key: broken.privateKey, public_key: broken.publicKey }).where('box_id', '=', box.id).execute();
      await t.cp.store.db.updateTable('server_keys').set({ private_key: broken.privateKey, public_key: broken.publicKey }).where('name', '=', 'gateway-host-key').execute();

      const table = await gateway.syncGateway({ gatewayId: 'g1', endpoint, activity: [] });
      const hostKey = table.boxes.find((b) => b.id === box.id)!.hostKey!;
      expect(hostKey).not.toBe(broken.privateKey);
      expect(ssh2.utils.parseKey(hostKey)).not.toBeInstanceOf(Error);
      expect(table.gatewayHostKey).not.toBe(broken.privateKey);
      expect(ssh2.utils.parseKey(table.gatewayHostKey)).not.toBeInstanceOf(Error);
      // What the CLI pins for the box is the public half of the key the gateway serves.
      const conn = await t.user.getBoxConnection('keyed');
      expect(conn.hostKey).toBe(`ssh-ed25519 ${(ssh2.utils.parseKey(hostKey) as ssh2.ParsedKey).getPublicSSH().toString('base64')}`);
      // Stable from then on.
      const again = await gateway.syncGateway({ gatewayId: 'g1', endpoint, activity: [] });
      expect(again.boxes.find((b) => b.id === box.id)!.hostKey).toBe(hostKey);
      expect(again.gatewayHostKey).toBe(table.gatewayHostKey);
    });
  });
});
