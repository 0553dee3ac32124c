/*
 * devyard-idmap-mount FROM TO COUNT SOURCE TARGET [SOURCE TARGET]...
 *
 * Bind-mounts each SOURCE at TARGET as a read-only idmapped mount (Linux >= 5.12): a file owned on disk by
 * uid/gid FROM+n (n < COUNT) shows as TO+n through the mount; ids outside the range show as the
 * overflow id and cannot be changed through it. The sandbox runtime stacks these mounts as the
 * read-only lower layers of a box's overlay, so one shared image tree stored in the image id range
 * appears owned by each box's own id range, without a copy.
 *
 * util-linux gained `X-mount.idmap` only in 2.39; Debian 12 ships 2.38, hence this helper.
 * Runs as host root, in the mount namespace the mounts are for. Exit 0, or 1 with a message.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int fail(const char *what, const char *arg) {
  fprintf(stderr, "devyard-idmap-mount: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
  return 1;
}

static int write_file(const char *path, const char *text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = write(fd, text, strlen(text));
  int saved = errno;
  close(fd);
  errno = saved;
  return n == (ssize_t)strlen(text) ? 0 : -1;
}

static int parse_id(const char *s, unsigned long *out) {
  char *end;
  errno = 0;
  *out = strtoul(s, &end, 10);
  return errno || *end || end == s || *out > 0xfffffffeUL ? -1 : 0;
}

/*
 * A user namespace whose map says "on-disk FROM+n is TO+n": a child unshares it and waits; this
 * process (root in the parent namespace) writes the maps and keeps a descriptor of it.
 */
static int make_userns(unsigned long from, unsigned long to, unsigned long count) {
  int ready[2], done[2];
  if (pipe2(ready, O_CLOEXEC) || pipe2(done, O_CLOEXEC)) return -1;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    char c = 0;
    close(ready[0]);
    close(done[1]);
    if (unshare(CLONE_NEWUSER)) _exit(1);
    if (write(ready[1], &c, 1) != 1) _exit(1);
    /* Until the parent has opened the namespace and closes its end. */
    (void)!read(done[0], &c, 1);
    _exit(0);
  }
  close(ready[1]);
  close(done[0]);
  char c, path[64], map[96];
  int fd = -1;
  if (read(ready[0], &c, 1) == 1) {
    snprintf(map, sizeof map, "%lu %lu %lu\n", from, to, count);
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
    if (write_file(path, map) == 0) {
      snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
      if (write_file(path, map) == 0) {
        snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
      }
    }
  } else {
    errno = ECHILD;
  }
  int saved = errno;
  close(done[1]);
  close(ready[0]);
  waitpid(pid, NULL, 0);
  errno = saved;
  return fd;
}

int main(int argc, char **argv) {
  unsigned long from, to, count;
  if (argc < 6 || (argc - 4) % 2 != 0) {
    fprintf(stderr, "usage: devyard-idmap-mount FROM TO COUNT SOURCE TARGET [SOURCE TARGET]...\n");
    return 2;
  }
  if (parse_id(argv[1], &from) || parse_id(argv[2], &to) || parse_id(argv[3], &count) || count == 0) {
    fprintf(stderr, "devyard-idmap-mount: FROM, TO and COUNT must be ids\n");
    return 2;
  }
  int userns = make_userns(from, to, count);
  if (userns < 0) return fail("creating the mapping namespace", NULL);
  for (int i = 4; i < argc; i += 2) {
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, argv[i], OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (tree < 0) return fail("open_tree", argv[i]);
    /* Read-only too: the mounts are lower layers, written by nobody. */
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, .userns_fd = (unsigned long long)userns};
    if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &attr, sizeof attr)) return fail("idmapping", argv[i]);
    if (syscall(SYS_move_mount, tree, "", AT_FDCWD, argv[i + 1], MOVE_MOUNT_F_EMPTY_PATH)) return fail("move_mount to", argv[i + 1]);
    close(tree);
  }
  return 0;
}
