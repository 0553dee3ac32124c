import { test } from 'vitest';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { run, testDriver, boxLeftovers } from './sandbox-test-host.js';
import { execSync } from 'node:child_process';
test('scratch', async () => {
  const { driver, dataDir } = await testDriver('scr', 229);
  await driver.init();
  const image = await new BuiltinImageStore({ dataDir }).ensure('tiny');
  const s = { boxId: 'b_s1', name: 's1', imageRootfs: image.rootfs, imageDigest: image.digest, resources: { cpuMillis: 500, memoryBytes: 64 << 20, pids: 64 }, env: {} };
  try {
    await driver.create(s); await driver.start(s);
    console.log(await run(driver, 'b_s1', ['sh', '-c', 'cat /proc/self/cgroup; grep -E "NoNew|Secc" /proc/self/status']));
    const bg = await driver.exec('b_s1', { argv: ['nc', '-ll', '-p', '8080', '-e', 'echo', 'from-b'] });
    bg.stderr.on('data', (d) => console.log('nc err', d.toString()));
    await new Promise((r) => setTimeout(r, 300));
    console.log(execSync(`echo | nc -w1 ${(await driver.inspect('b_s1')).ip} 8080 || true`).toString());
    await run(driver, 'b_s1', ['sh', '-c', 'sleep 100 & sleep 100 & true']);
    await driver.pause('b_s1');
    console.log('paused');
    const t = performance.now();
    await Promise.race([driver.destroy('b_s1'), new Promise((r) => setTimeout(r, 5000))]);
    console.log('destroy', performance.now() - t, boxLeftovers(driver, dataDir, 'b_s1'));
  } finally {
    await driver.destroy('b_s1'); await driver.teardownHost();
  }
}, 60000);
