/*
 * devyard-vm-jail: starts one microVM's QEMU jailed, the way Firecracker's jailer starts
 * Firecracker. A guest that escapes into its QEMU finds a process that is not root, holds no
 * capability, may not make most system calls (QEMU's own seccomp filter), and sees a file tree
 * with that VM's files in it and nothing else of the host.
 *
 *   devyard-vm-jail --root DIR --uid UID --gid GID --qmp SOCKET --log FILE
 *                   [--ro PATH]... [--rw PATH]... [--dev PATH]... -- PROGRAM [ARG]...
 *
 * 1. A mount namespace of its own, every mount private: nothing mounted here reaches the host, and
 *    nothing the host mounts later (another VM's files) appears here.
 * 2. An empty tmpfs on DIR (an empty directory) becomes the root. Each --ro and --rw PATH is
 *    bind-mounted at the same path inside: read-only, or writable for the VM's own files (its RAM
 *    file, disks and run directory); never with set-uid programs or device nodes. The same paths
 *    inside and out keep QEMU's command line, sockets and pid file meaningful on both sides. A PATH
 *    that is a symlink on the host (merged /usr: /lib -> usr/lib) is the same symlink inside; one
 *    that does not exist is left out, so that QEMU says in its own words what it cannot open. Each
 *    --dev PATH becomes a device node of the same number, the VM's own (0600).
 * 3. pivot_root into it and detach the old root: the host's tree is no longer reachable at all
 *    (no /proc either). The new root is then remounted read-only.
 * 4. A child starts a session of its own, keeps no file descriptor but /dev/null and the log,
 *    drops to UID/GID with no supplementary groups, clears every capability set including the
 *    bounding set, sets no_new_privs and umask 077, and execs PROGRAM with PATH as its only
 *    environment (the node agent's environment holds credentials QEMU has no use for).
 *    QEMU's seccomp filter (`-sandbox …,spawn=deny,elevateprivileges=deny`) forbids the fork and
 *    setsid of its own -daemonize, so the daemonizing happens here.
 * 5. The parent waits until QEMU answers on its QMP socket — its initialisation is done, which is
 *    what -daemonize waited for — and exits 0. If QEMU exits first, the parent copies QEMU's log to
 *    its stderr and exits with QEMU's status.
 *
 * Built by the node with gcc (vm-jail-binary.ts) and run as root by the node agent only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PATHS 64
/* QEMU initialises in well under a second; a loaded node under TCG gets ample slack. */
#define READY_TIMEOUT_MS 60000

static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("devyard-vm-jail: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(125);
}

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* mkdir -p of an absolute path (inside the new root, which is still a plain directory here). */
static void mkdirs(const char *path) {
  char buf[4096];
  if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf)) die("path too long: %s", path);
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    if (mkdir(buf, 0755) < 0 && errno != EEXIST) die("mkdir %s: %s", buf, strerror(errno));
    *p = '/';
  }
  if (mkdir(buf, 0755) < 0 && errno != EEXIST) die("mkdir %s: %s", buf, strerror(errno));
}

static void parent_dirs(const char *path) {
  char buf[4096];
  snprintf(buf, sizeof(buf), "%s", path);
  char *slash = strrchr(buf, '/');
  if (slash && slash != buf) {
    *slash = 0;
    mkdirs(buf);
  }
}

/* Makes `path` of the host appear at root+path: a bind mount, or the same symlink. */
static void bind_path(const char *root, const char *path, int writable) {
  char dst[4096];
  struct stat st;
  if (path[0] != '/') die("not an absolute path: %s", path);
  if (lstat(path, &st) < 0) {
    if (errno == ENOENT) return;
    die("%s: %s", path, strerror(errno));
  }
  if (snprintf(dst, sizeof(dst), "%s%s", root, path) >= (int)sizeof(dst)) die("path too long: %s", path);
  parent_dirs(dst);
  if (S_ISLNK(st.st_mode)) {
    char target[4096];
    ssize_t n = readlink(path, target, sizeof(target) - 1);
    if (n < 0) die("readlink %s: %s", path, strerror(errno));
    target[n] = 0;
    if (symlink(target, dst) < 0 && errno != EEXIST) die("symlink %s: %s", dst, strerror(errno));
    return;
  }
  if (S_ISDIR(st.st_mode)) {
    mkdirs(dst);
  } else {
    int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) die("create %s: %s", dst, strerror(errno));
    close(fd);
  }
  if (mount(path, dst, NULL, MS_BIND, NULL) < 0) die("bind %s: %s", path, strerror(errno));
  unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (writable ? MS_NOEXEC : MS_RDONLY);
  if (mount(NULL, dst, NULL, flags, NULL) < 0) die("remount %s: %s", path, strerror(errno));
}

/* A device node like the host's `path`, owned by the VM. */
static void make_device(const char *root, const char *path, uid_t uid, gid_t gid) {
  char dst[4096];
  struct stat st;
  if (stat(path, &st) < 0) {
    if (errno == ENOENT) return;
    die("%s: %s", path, strerror(errno));
  }
  if (!S_ISCHR(st.st_mode)) die("%s is not a character device", path);
  snprintf(dst, sizeof(dst), "%s%s", root, path);
  parent_dirs(dst);
  if (mknod(dst, S_IFCHR | 0600, st.st_rdev) < 0) die("mknod %s: %s", dst, strerror(errno));
  if (chown(dst, uid, gid) < 0) die("chown %s: %s", dst, strerror(errno));
}

static unsigned long parse_id(const char *s, const char *what) {
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 10);
  /* 0 is root; (uid_t)-1 means "unchanged" to the set*id calls. */
  if (errno || *end || v == 0 || v >= 0xffffffffUL) die("invalid %s: %s", what, s);
  return v;
}

/* Drops everything a root process holds, then runs the program. Never returns. */
static void __attribute__((noreturn)) exec_unprivileged(uid_t uid, gid_t gid, int log_fd, char **argv) {
  if (setsid() < 0) die("setsid: %s", strerror(errno));
  int null_fd = open("/dev/null", O_RDWR);
  if (null_fd < 0) die("/dev/null: %s", strerror(errno));
  if (dup2(null_fd, 0) < 0 || dup2(null_fd, 1) < 0 || dup2(log_fd, 2) < 0) die("dup2: %s", strerror(errno));
  if (syscall(SYS_close_range, 3U, ~0U, 0) < 0) die("close_range: %s", strerror(errno));
  for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++) {
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) die("dropping capability %d: %s", cap, strerror(errno));
  }
  if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL) die("ambient capabilities: %s", strerror(errno));
  if (setgroups(0, NULL) < 0) die("setgroups: %s", strerror(errno));
  if (setresgid(gid, gid, gid) < 0) die("setresgid: %s", strerror(errno));
  if (setresuid(uid, uid, uid) < 0) die("setresuid: %s", strerror(errno));
  /* Leaving root cleared the permitted and effective sets; the inheritable one is cleared here. */
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2];
  memset(data, 0, sizeof(data));
  if (syscall(SYS_capset, &hdr, data) < 0) die("capset: %s", strerror(errno));
  if (setuid(0) == 0 || setgid(0) == 0) die("could regain root after dropping it");
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("no_new_privs: %s", strerror(errno));
  umask(077);
  char *envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", NULL};
  execvpe(argv[0], argv, envp);
  die("exec %s: %s", argv[0], strerror(errno));
}

/* Reads from fd until a line holding `want` arrived; 1 when it did, 0 on EOF, error or timeout. */
static int read_until(int fd, const char *want, long long deadline) {
  char buf[8192];
  size_t len = 0;
  for (;;) {
    long long left = deadline - now_ms();
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (left <= 0 || poll(&p, 1, (int)left) <= 0) return 0;
    if (len == sizeof(buf) - 1) len = 0; /* the greeting is long; only its end matters */
    ssize_t n = read(fd, buf + len, sizeof(buf) - 1 - len);
    if (n <= 0) return 0;
    len += (size_t)n;
    buf[len] = 0;
    if (strstr(buf, want) && strchr(buf, '\n')) return 1;
  }
}

/* Whether QEMU's QMP answers a command: its main loop runs, so its initialisation is done. */
static int qmp_ready(const char *path, long long deadline) {
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof(a.sun_path)) die("QMP socket path too long: %s", path);
  strcpy(a.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket: %s", strerror(errno));
  int ok = 0;
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0 && read_until(fd, "\"QMP\"", deadline)) {
    static const char caps[] = "{\"execute\":\"qmp_capabilities\"}\n";
    ok = write(fd, caps, sizeof(caps) - 1) == (ssize_t)(sizeof(caps) - 1) && read_until(fd, "\"return\"", deadline);
  }
  close(fd);
  return ok;
}

static void copy_log(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  char buf[4096];
  ssize_t n;
  while (fd >= 0 && (n = read(fd, buf, sizeof(buf))) > 0) {
    if (write(2, buf, (size_t)n) < 0) break;
  }
  if (fd >= 0) close(fd);
}

int main(int argc, char **argv) {
  const char *root = NULL, *qmp = NULL, *log_path = NULL;
  const char *ro[MAX_PATHS], *rw[MAX_PATHS], *dev[MAX_PATHS];
  size_t nro = 0, nrw = 0, ndev = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  int i = 1;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--")) {
      i++;
      break;
    }
    if (i + 1 >= argc) die("%s needs a value", a);
    const char *v = argv[++i];
    if (!strcmp(a, "--root")) root = v;
    else if (!strcmp(a, "--uid")) uid = (uid_t)parse_id(v, "uid");
    else if (!strcmp(a, "--gid")) gid = (gid_t)parse_id(v, "gid");
    else if (!strcmp(a, "--qmp")) qmp = v;
    else if (!strcmp(a, "--log")) log_path = v;
    else if (!strcmp(a, "--ro") && nro < MAX_PATHS) ro[nro++] = v;
    else if (!strcmp(a, "--rw") && nrw < MAX_PATHS) rw[nrw++] = v;
    else if (!strcmp(a, "--dev") && ndev < MAX_PATHS) dev[ndev++] = v;
    else die("unknown or repeated too often: %s", a);
  }
  if (!root || root[0] != '/' || !qmp || !log_path || !uid || !gid || i >= argc) {
    die("usage: devyard-vm-jail --root DIR --uid UID --gid GID --qmp SOCKET --log FILE [--ro PATH]... [--rw PATH]... [--dev PATH]... -- PROGRAM [ARG]...");
  }
  char **program = argv + i;

  if (unshare(CLONE_NEWNS) < 0) die("unshare: %s", strerror(errno));
  if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) die("making mounts private: %s", strerror(errno));
  /* Device nodes live on this tmpfs: not nodev. Nothing on it is executed. */
  if (mount("jail", root, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m,nr_inodes=4096") < 0) die("tmpfs on %s: %s", root, strerror(errno));
  for (size_t k = 0; k < nro; k++) bind_path(root, ro[k], 0);
  for (size_t k = 0; k < nrw; k++) bind_path(root, rw[k], 1);
  for (size_t k = 0; k < ndev; k++) make_device(root, dev[k], uid, gid);
  if (chdir(root) < 0) die("chdir %s: %s", root, strerror(errno));
  if (syscall(SYS_pivot_root, ".", ".") < 0) die("pivot_root: %s", strerror(errno));
  if (umount2(".", MNT_DETACH) < 0) die("detaching the host's root: %s", strerror(errno));
  if (chdir("/") < 0) die("chdir /: %s", strerror(errno));
  if (mount(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, NULL) < 0) die("read-only root: %s", strerror(errno));

  int log_fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
  if (log_fd < 0) die("%s: %s", log_path, strerror(errno));
  if (fchown(log_fd, uid, gid) < 0) die("chown %s: %s", log_path, strerror(errno));

  pid_t child = fork();
  if (child < 0) die("fork: %s", strerror(errno));
  if (child == 0) exec_unprivileged(uid, gid, log_fd, program);
  close(log_fd);

  long long deadline = now_ms() + READY_TIMEOUT_MS;
  for (;;) {
    int status;
    if (waitpid(child, &status, WNOHANG) == child) {
      copy_log(log_path);
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (qmp_ready(qmp, deadline)) return 0;
    if (now_ms() > deadline) {
      kill(child, SIGKILL);
      copy_log(log_path);
      die("QEMU did not answer on %s within %d s", qmp, READY_TIMEOUT_MS / 1000);
    }
    usleep(2000);
  }
}
