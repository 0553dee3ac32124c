/*
 * devyard-guest-agent: PID 1 of a Devyard microVM (after the initramfs set up the disks).
 *
 * It speaks the frame protocol of PROTOCOL.md (next to this file) with the node agent over one
 * virtio-serial port, and runs everything the host asks for: exec sessions (pipes or a pty), TCP
 * connections to the VM's own localhost, file transfers and a few system settings.
 *
 * Design constraints:
 * - PID 1 must never exit and must reap every child, orphans included; SIGCHLD only wakes the
 *   event loop (self-pipe), the loop reaps with waitpid(-1, WNOHANG).
 * - One thread, one poll() loop, no blocking writes: bytes for a child's stdin or a socket are
 *   queued per session and written on POLLOUT; bytes for the host are buffered and, above a high
 *   water mark, the agent stops reading session fds (that is the only backpressure the protocol has).
 * - Built with `gcc -static`: nothing here may use NSS (no getpwnam & co).
 * - Every host frame is checked against its type's layout before anything acts on it: exact
 *   sizes, NUL-terminated strings, counts the payload can hold, no bytes left over. A frame that
 *   does not fit is answered with ERR (`malformed <TYPE> frame: <why>`) and nothing else happens:
 *   guessing what a garbled frame meant could run, write or remove the wrong thing.
 * - A RAM snapshot of the VM must not carry the box's secrets after QUIESCE: secret files are
 *   overwritten with zeros before they go, this process zeroes every buffer byte it is done with
 *   (host frames, output, file and socket reads), and frames that carry secrets arrive sealed under
 *   a key it forgets on QUIESCE (see "sealed frames" below). Memory the kernel frees is zeroed when
 *   the VM boots with init_on_free=1.
 *
 * Test mode: `--unix PATH` connects to a unix socket instead of the port and exits when the
 * connection ends, so the protocol can be tested on a host without a VM.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define HDR_LEN 9
#define MAX_PAYLOAD (1u << 20)
#define CHUNK (64u << 10)
#define OUT_HIGH_WATER (8u << 20)
#define RECONNECT_MS 20
/* Bounds the final drain of a session's pipes: a background child may keep writing forever. */
#define EXIT_DRAIN_MAX (4u << 20)
/* The clock is only stepped when it is off by more than this: tiny backward steps on every
 * re-handshake would do more harm (make, log ordering) than the transport's jitter is worth. */
#define CLOCK_STEP_NS 100000000LL
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum {
  T_HELLO = 0x01, T_EXEC, T_STDIN, T_STDIN_EOF, T_SIGNAL, T_RESIZE, T_TCP_CONNECT, T_TCP_DATA,
  T_TCP_EOF, T_CLOSE, T_PUT_FILE, T_GET_FILE, T_REPLACE_DIR, T_HEALTH, T_SET_IDENTITY, T_QUIESCE,
  T_NET_CONFIG, T_KEY, T_SEALED,
};
enum {
  G_OK = 0x81, G_ERR, G_STDOUT, G_STDERR, G_STARTED, G_EXIT, G_CONNECTED, G_CONNECT_FAILED,
  G_TCP_DATA, G_TCP_EOF, G_CLOSED, G_FILE_DATA,
};

/* ---- byte buffers ------------------------------------------------------------------------- */

struct buf {
  unsigned char *p;
  size_t off, len, cap; /* live bytes are p[off..len) */
};

static size_t buf_avail(const struct buf *b) { return b->len - b->off; }

/* Buffers zero what they are done with: bytes that passed through (a secret in an EXEC frame, a
 * secret file a session printed) must not outlive their use in this process's memory. */
static void buf_clear(struct buf *b) {
  if (b->p) explicit_bzero(b->p, b->len);
  b->off = b->len = 0;
}

static void buf_free(struct buf *b) {
  if (b->p) explicit_bzero(b->p, b->cap);
  free(b->p);
  memset(b, 0, sizeof(*b));
}

/* Makes room for n more bytes; returns 0, or -1 when memory is exhausted (the caller drops data:
 * as PID 1 we must not abort). */
static int buf_reserve(struct buf *b, size_t n) {
  if (b->off > 0 && (b->off == b->len || b->len + n > b->cap)) {
    size_t live = b->len - b->off;
    memmove(b->p, b->p + b->off, live);
    explicit_bzero(b->p + live, b->len - live);
    b->len = live;
    b->off = 0;
  }
  if (b->len + n <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 4096;
  while (cap < b->len + n) cap *= 2;
  /* Not realloc: it would free the old block with its bytes still in it. */
  unsigned char *p = malloc(cap);
  if (!p) return -1;
  if (b->p) {
    memcpy(p, b->p, b->len);
    explicit_bzero(b->p, b->cap);
    free(b->p);
  }
  b->p = p;
  b->cap = cap;
  return 0;
}

static int buf_put(struct buf *b, const void *d, size_t n) {
  if (buf_reserve(b, n) < 0) return -1;
  memcpy(b->p + b->len, d, n);
  b->len += n;
  return 0;
}

static void buf_consume(struct buf *b, size_t n) {
  explicit_bzero(b->p + b->off, n);
  b->off += n;
  if (b->off == b->len) b->off = b->len = 0;
}

/* ---- global state ------------------------------------------------------------------------- */

static const char *g_root = "/newroot";
static const char *g_port_path;
static int g_unix_mode;
static int g_port = -1;
static int g_connected; /* port mode: whether a host is attached (reads do not return EOF) */
static struct buf g_in, g_out;
static int g_sig_r = -1, g_sig_w = -1;
static long long g_last_host_ms; /* for HEALTH idle_ms */
/* The key SEALED frames are opened with (see "sealed frames"), while the host holds it too. */
static unsigned char g_key[32];
static int g_have_key;

static void forget_key(void) {
  explicit_bzero(g_key, sizeof(g_key));
  g_have_key = 0;
}

enum kind { K_EXEC, K_TCP, K_FILE };

struct session {
  uint32_t id;
  enum kind kind;
  int dead; /* ended; freed at the end of the loop iteration (poll entries may still point here) */
  struct buf q; /* bytes waiting for the child's stdin or the socket */
  /* exec: with a tty, out_fd is the pty master and also takes stdin; in_fd stays -1 */
  pid_t pid;
  int tty, in_fd, out_fd, err_fd;
  int out_eof;   /* tty: the master reported EIO (slave side closed) */
  int stdin_eof; /* close in_fd once q is written */
  /* tcp and file transfers */
  int fd;
  int connecting, rd_eof, wr_eof_pending, wr_shut;
};

static struct session **g_sess;
static size_t g_nsess, g_capsess;

static void logmsg(const char *fmt, ...) {
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  dprintf(2, "devyard-guest-agent: %s\n", line);
}

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void xclose(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* ---- output to the host ------------------------------------------------------------------- */

static void host_gone(void) {
  /* Nobody will read what is buffered, and a later host must start at a frame boundary. */
  if (g_unix_mode) exit(0);
  if (g_connected) logmsg("host disconnected");
  g_connected = 0;
  buf_clear(&g_out);
}

static void port_flush(void) {
  while (buf_avail(&g_out) > 0) {
    ssize_t n = write(g_port, g_out.p + g_out.off, buf_avail(&g_out));
    if (n > 0) {
      buf_consume(&g_out, (size_t)n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && errno == EAGAIN) {
      return;
    } else {
      host_gone();
      return;
    }
  }
}

static void send_frame(uint32_t ch, uint8_t type, const void *payload, size_t len) {
  if (!g_connected) return; /* PROTOCOL.md: frames that cannot be written are dropped */
  unsigned char hdr[HDR_LEN];
  uint32_t l = (uint32_t)len;
  for (int i = 0; i < 4; i++) {
    hdr[i] = (unsigned char)(l >> (8 * i));
    hdr[4 + i] = (unsigned char)(ch >> (8 * i));
  }
  hdr[8] = type;
  int was_empty = buf_avail(&g_out) == 0;
  if (buf_reserve(&g_out, HDR_LEN + len) < 0) {
    logmsg("out of memory, frame dropped");
    return;
  }
  buf_put(&g_out, hdr, HDR_LEN);
  if (len) buf_put(&g_out, payload, len);
  /* When bytes were already waiting, poll's POLLOUT flushes them in order. */
  if (was_empty) port_flush();
}

static void send_i32(uint32_t ch, uint8_t type, int32_t v) {
  unsigned char b[4];
  for (int i = 0; i < 4; i++) b[i] = (unsigned char)((uint32_t)v >> (8 * i));
  send_frame(ch, type, b, 4);
}

static void send_err(uint32_t ch, const char *fmt, ...) {
  char text[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(text, sizeof(text), fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  if ((size_t)n >= sizeof(text)) n = sizeof(text) - 1;
  send_frame(ch, G_ERR, text, (size_t)n);
}

static int out_has_room(void) { return !g_connected || buf_avail(&g_out) < OUT_HIGH_WATER; }

/* ---- sessions ----------------------------------------------------------------------------- */

static struct session *find_session(uint32_t id) {
  for (size_t i = 0; i < g_nsess; i++)
    if (!g_sess[i]->dead && g_sess[i]->id == id) return g_sess[i];
  return NULL;
}

static struct session *new_session(uint32_t id, enum kind kind) {
  if (g_nsess == g_capsess) {
    size_t cap = g_capsess ? g_capsess * 2 : 64;
    struct session **p = realloc(g_sess, cap * sizeof(*p));
    if (!p) return NULL;
    g_sess = p;
    g_capsess = cap;
  }
  struct session *s = calloc(1, sizeof(*s));
  if (!s) return NULL;
  s->id = id;
  s->kind = kind;
  s->in_fd = s->out_fd = s->err_fd = s->fd = -1;
  g_sess[g_nsess++] = s;
  return s;
}

/* Closes the session's fds without telling the host; an exec process keeps running. */
static void session_end(struct session *s) {
  xclose(&s->in_fd);
  xclose(&s->out_fd);
  xclose(&s->err_fd);
  xclose(&s->fd);
  buf_free(&s->q);
  s->dead = 1;
}

static void sweep_sessions(void) {
  size_t j = 0;
  for (size_t i = 0; i < g_nsess; i++) {
    if (g_sess[i]->dead) free(g_sess[i]);
    else g_sess[j++] = g_sess[i];
  }
  g_nsess = j;
}

/* ---- payload parsing ---------------------------------------------------------------------- */

struct rd {
  const unsigned char *p;
  size_t n;
  int bad;
};

static uint64_t rd_int(struct rd *r, int bytes) {
  if (r->n < (size_t)bytes) {
    r->bad = 1;
    return 0;
  }
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v |= (uint64_t)r->p[i] << (8 * i);
  r->p += bytes;
  r->n -= (size_t)bytes;
  return v;
}

static const char *rd_str(struct rd *r) {
  const unsigned char *nul = r->n ? memchr(r->p, 0, r->n) : NULL;
  if (!nul) {
    r->bad = 1;
    return "";
  }
  const char *s = (const char *)r->p;
  r->n -= (size_t)(nul - r->p) + 1;
  r->p = nul + 1;
  return s;
}

/* Whether the payload was read exactly: nothing missing, nothing left over. Bytes left over mean
 * that the host and we disagree about the frame's layout. */
static int rd_done(const struct rd *r) { return !r->bad && r->n == 0; }

static const char *const FRAME_NAMES[] = {
  [T_HELLO] = "HELLO", [T_EXEC] = "EXEC", [T_STDIN] = "STDIN", [T_STDIN_EOF] = "STDIN_EOF",
  [T_SIGNAL] = "SIGNAL", [T_RESIZE] = "RESIZE", [T_TCP_CONNECT] = "TCP_CONNECT",
  [T_TCP_DATA] = "TCP_DATA", [T_TCP_EOF] = "TCP_EOF", [T_CLOSE] = "CLOSE", [T_PUT_FILE] = "PUT_FILE",
  [T_GET_FILE] = "GET_FILE", [T_REPLACE_DIR] = "REPLACE_DIR", [T_HEALTH] = "HEALTH",
  [T_SET_IDENTITY] = "SET_IDENTITY", [T_QUIESCE] = "QUIESCE", [T_NET_CONFIG] = "NET_CONFIG",
  [T_KEY] = "KEY", [T_SEALED] = "SEALED",
};

/* Answers a malformed frame (type is a known host type) with ERR. ERR on a session's channel also
 * says that the session is gone (PROTOCOL.md), so a session there ends too: both sides keep the
 * same picture of what is open. */
static void refuse(uint32_t ch, uint8_t type, const char *why) {
  struct session *s = find_session(ch);
  if (s) session_end(s);
  send_err(ch, "malformed %s frame: %s", FRAME_NAMES[type], why);
}

/* ---- paths and files ---------------------------------------------------------------------- */

/* Maps a path inside the image root to one in our namespace, refusing `..` components so the
 * host cannot address anything outside the root through them. */
static int root_path(const char *rel, char *out, size_t size) {
  if (!*rel) return errno = EINVAL, -1;
  for (const char *c = rel; *c;) {
    const char *e = strchrnul(c, '/');
    if (e - c == 2 && c[0] == '.' && c[1] == '.') return errno = EINVAL, -1;
    c = *e ? e + 1 : e;
  }
  while (*rel == '/') rel++;
  const char *sep = g_root[strlen(g_root) - 1] == '/' ? "" : "/";
  if ((size_t)snprintf(out, size, "%s%s%s", g_root, sep, rel) >= size) return errno = ENAMETOOLONG, -1;
  return 0;
}

static int path_join(char *out, size_t size, const char *dir, const char *name) {
  int n = snprintf(out, size, "%s/%s", dir, name);
  return n < 0 || (size_t)n >= size ? (errno = ENAMETOOLONG, -1) : 0;
}

static int mkdir_p(const char *dir) {
  char p[PATH_MAX];
  if (snprintf(p, sizeof(p), "%s", dir) >= (int)sizeof(p)) return errno = ENAMETOOLONG, -1;
  for (char *c = p + 1; *c; c++) {
    if (*c != '/') continue;
    *c = 0;
    if (mkdir(p, 0755) < 0 && errno != EEXIST) return -1;
    *c = '/';
  }
  if (mkdir(p, 0755) < 0 && errno != EEXIST) return -1;
  return 0;
}

static int mkdir_parent(const char *path) {
  char d[PATH_MAX];
  snprintf(d, sizeof(d), "%s", path);
  char *slash = strrchr(d, '/');
  if (!slash || slash == d) return 0;
  *slash = 0;
  return mkdir_p(d);
}

/* Writes through a temp file in the same directory and renames it over the target, so readers
 * (and a crash) never see a half-written file. */
static int write_atomic(const char *path, const void *data, size_t len, mode_t mode, int root_owned) {
  char tmp[PATH_MAX];
  const char *slash = strrchr(path, '/');
  int dirlen = slash ? (int)(slash - path) : 0;
  if (snprintf(tmp, sizeof(tmp), "%.*s/.devyard-tmp-XXXXXX", dirlen, path) >= (int)sizeof(tmp))
    return errno = ENAMETOOLONG, -1;
  int fd = mkostemp(tmp, O_CLOEXEC);
  if (fd < 0) return -1;
  const unsigned char *p = data;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) goto fail;
    p += n;
    len -= (size_t)n;
  }
  if (fchmod(fd, mode) < 0) goto fail;
  if (root_owned && fchown(fd, 0, 0) < 0) goto fail;
  if (close(fd) < 0) {
    fd = -1;
    goto fail;
  }
  if (rename(tmp, path) < 0) {
    fd = -1;
    goto fail;
  }
  return 0;
fail:;
  int e = errno;
  if (fd >= 0) close(fd);
  unlink(tmp);
  errno = e;
  return -1;
}

/* Overwrites a regular file's bytes with zeros where they lie: a tmpfs file's pages are its
 * storage, and freeing them (unlink) would leave the bytes in free memory until reused. */
static void wipe_fd(int fd) {
  static const unsigned char zeros[4096];
  struct stat st;
  if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) return;
  for (off_t off = 0; off < st.st_size;) {
    size_t n = st.st_size - off < (off_t)sizeof(zeros) ? (size_t)(st.st_size - off) : sizeof(zeros);
    ssize_t w = pwrite(fd, zeros, n, off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    off += w;
  }
}

/* Removes an entry of a tree rm_rf walks: what is removed here is the secrets directory's, so a
 * file's content is wiped first. */
static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)flag, (void)ftw;
  if (S_ISREG(st->st_mode)) {
    int fd = open(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    wipe_fd(fd);
    if (fd >= 0) close(fd);
  }
  return remove(path);
}

static int rm_rf(const char *path) {
  return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS) < 0 && errno != ENOENT ? -1 : 0;
}

/* Removes every entry of dir except the names in keep (count entries; NULL keeps nothing). */
static int clear_dir(const char *dir, const char **keep, size_t count) {
  DIR *d = opendir(dir);
  if (!d) return -1;
  struct dirent *e;
  int rc = 0;
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    int kept = 0;
    for (size_t i = 0; i < count && !kept; i++) kept = !strcmp(keep[i], e->d_name);
    if (kept) continue;
    char p[PATH_MAX];
    if (path_join(p, sizeof(p), dir, e->d_name) < 0 || rm_rf(p) < 0) rc = -1;
  }
  closedir(d);
  return rc;
}

static ssize_t read_small(const char *path, char *buf, size_t size) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, size - 1);
  close(fd);
  buf[n > 0 ? n : 0] = 0;
  return n;
}

/* ---- exec --------------------------------------------------------------------------------- */

static void reset_signals(void) {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  /* execve keeps SIG_IGN (our SIGPIPE), so every disposition is reset explicitly. */
  for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
}

/* execvpe with the PATH of the child's env (not ours); returns the errno to report. */
static int exec_search(char **argv, char **envp) {
  if (strchr(argv[0], '/')) {
    execve(argv[0], argv, envp);
    return errno;
  }
  if (!*argv[0]) return ENOENT;
  const char *path = DEFAULT_PATH;
  for (char **e = envp; *e; e++)
    if (!strncmp(*e, "PATH=", 5)) path = *e + 5;
  int err = ENOENT, eacces = 0;
  for (const char *dir = path;;) {
    const char *end = strchrnul(dir, ':');
    char full[PATH_MAX];
    int dl = (int)(end - dir);
    snprintf(full, sizeof(full), "%.*s/%s", dl ? dl : 1, dl ? dir : ".", argv[0]);
    execve(full, argv, envp);
    if (errno == EACCES) eacces = 1;
    else if (errno != ENOENT && errno != ENOTDIR) return errno;
    if (!*end) break;
    dir = end + 1;
  }
  return eacces ? EACCES : err;
}

static void __attribute__((noreturn)) child_exec(int tty, int stdio[3], const char *cwd, char **argv, char **envp) {
  reset_signals();
  setsid();
  if (tty && ioctl(stdio[0], TIOCSCTTY, 0) < 0) dprintf(stdio[2], "devyard: TIOCSCTTY: %s\n", strerror(errno));
  /* Every fd of the agent is O_CLOEXEC; dup2 clears the flag on the three we hand over. */
  for (int i = 0; i < 3; i++) dup2(stdio[i], i);
  int err = 0;
  if (chroot(g_root) < 0 || chdir("/") < 0) err = errno;
  if (!err) {
    /* A failed chdir leaves us at "/", which is the documented fallback. */
    if (*cwd && chdir(cwd) < 0) errno = 0;
    err = exec_search(argv, envp);
  }
  dprintf(2, "devyard: %s: %s\n", argv[0], strerror(err));
  _exit(127);
}

static void do_exec(uint32_t id, struct rd *r) {
  int tty = (int)rd_int(r, 1) & 1;
  unsigned short cols = (unsigned short)rd_int(r, 2), rows = (unsigned short)rd_int(r, 2);
  size_t argc = (size_t)rd_int(r, 2), envc = (size_t)rd_int(r, 2);
  /* Each string takes at least its NUL: counts the payload cannot hold are refused before
   * anything is allocated for them. */
  const char *why = r->bad ? "shorter than its 9-byte head" : argc == 0 ? "no program"
                  : 1 + argc + envc > r->n ? "more strings announced than the payload holds" : NULL;
  if (why) {
    refuse(id, T_EXEC, why);
    return;
  }
  const char *cwd = rd_str(r);
  char **argv = calloc(argc + 1, sizeof(char *)), **envp = calloc(envc + 1, sizeof(char *));
  for (size_t i = 0; argv && i < argc; i++) argv[i] = (char *)rd_str(r);
  for (size_t i = 0; envp && i < envc; i++) envp[i] = (char *)rd_str(r);
  int parent[3] = {-1, -1, -1}, child[3] = {-1, -1, -1};
  struct session *s = NULL;
  if (!argv || !envp) {
    send_err(id, "out of memory");
    goto out;
  }
  if (!rd_done(r)) {
    refuse(id, T_EXEC, r->bad ? "a string without its NUL" : "bytes after the last string");
    goto out;
  }
  if (find_session(id)) {
    send_err(id, "channel %u is in use", id);
    goto out;
  }
  if (tty) {
    char name[64];
    parent[0] = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (parent[0] < 0 || grantpt(parent[0]) < 0 || unlockpt(parent[0]) < 0 ||
        ptsname_r(parent[0], name, sizeof(name)) != 0) {
      send_err(id, "pty: %s", strerror(errno));
      goto out;
    }
    /* Opened here, outside the chroot: the image need not have /dev/pts mounted. */
    child[0] = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (child[0] < 0) {
      send_err(id, "%s: %s", name, strerror(errno));
      goto out;
    }
    struct winsize ws = {.ws_row = rows ? rows : 24, .ws_col = cols ? cols : 80};
    ioctl(parent[0], TIOCSWINSZ, &ws);
    child[1] = dup(child[0]);
    child[2] = dup(child[0]);
  } else {
    for (int i = 0; i < 3; i++) {
      int p[2];
      if (pipe2(p, O_CLOEXEC) < 0) {
        send_err(id, "pipe: %s", strerror(errno));
        goto out;
      }
      /* stdin: the child reads p[0]; stdout/stderr: the child writes p[1]. */
      child[i] = i == 0 ? p[0] : p[1];
      parent[i] = i == 0 ? p[1] : p[0];
    }
  }
  s = new_session(id, K_EXEC);
  if (!s) {
    send_err(id, "out of memory");
    goto out;
  }
  pid_t pid = fork();
  if (pid == 0) child_exec(tty, child, cwd, argv, envp);
  if (pid < 0) {
    send_err(id, "fork: %s", strerror(errno));
    s->dead = 1;
    goto out;
  }
  s->pid = pid;
  s->tty = tty;
  for (int i = 0; i < 3; i++) {
    if (parent[i] >= 0) set_nonblock(parent[i]);
  }
  s->out_fd = tty ? parent[0] : parent[1];
  s->in_fd = tty ? -1 : parent[0];
  s->err_fd = tty ? -1 : parent[2];
  parent[0] = parent[1] = parent[2] = -1;
  send_i32(id, G_STARTED, pid);
out:
  for (int i = 0; i < 3; i++) {
    xclose(&parent[i]);
    xclose(&child[i]);
  }
  free(argv);
  free(envp);
}

static int stdin_fd(struct session *s) { return s->tty ? (s->out_eof ? -1 : s->out_fd) : s->in_fd; }

static void exec_flush_stdin(struct session *s) {
  int fd = stdin_fd(s);
  while (fd >= 0 && buf_avail(&s->q) > 0) {
    ssize_t n = write(fd, s->q.p + s->q.off, buf_avail(&s->q));
    if (n > 0) {
      buf_consume(&s->q, (size_t)n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && errno == EAGAIN) {
      return;
    } else {
      /* The process closed its stdin: what it did not read is lost, as with a local pipe. */
      buf_free(&s->q);
      if (!s->tty) xclose(&s->in_fd);
      return;
    }
  }
  if (!s->tty && s->stdin_eof) xclose(&s->in_fd);
}

/* Reads one chunk of the child's output; returns 1 when more may follow. */
static int exec_read(struct session *s, int *fd, uint8_t type) {
  unsigned char b[CHUNK];
  ssize_t n = read(*fd, b, sizeof(b));
  if (n > 0) {
    send_frame(s->id, type, b, (size_t)n);
    explicit_bzero(b, (size_t)n);
    return 1;
  }
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
  /* EOF, or EIO on a pty master whose slave side is closed. The master stays open until EXIT:
   * closing it would hang up processes that still hold the terminal. */
  if (s->tty) s->out_eof = 1;
  else xclose(fd);
  return 0;
}

static void exec_finish(struct session *s, int status) {
  size_t drained = 0;
  while (s->out_fd >= 0 && !s->out_eof && drained < EXIT_DRAIN_MAX && exec_read(s, &s->out_fd, G_STDOUT))
    drained += CHUNK;
  while (s->err_fd >= 0 && drained < EXIT_DRAIN_MAX && exec_read(s, &s->err_fd, G_STDERR)) drained += CHUNK;
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255;
  send_i32(s->id, G_EXIT, code);
  /* Background children holding the pipes must not keep the session open. */
  session_end(s);
}

static void reap_children(void) {
  int status;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    for (size_t i = 0; i < g_nsess; i++) {
      struct session *s = g_sess[i];
      if (!s->dead && s->kind == K_EXEC && s->pid == pid) {
        exec_finish(s, status);
        break;
      }
    }
  }
}

/* ---- tcp ---------------------------------------------------------------------------------- */

static void tcp_closed(struct session *s) {
  send_frame(s->id, G_CLOSED, NULL, 0);
  session_end(s);
}

static void do_tcp_connect(uint32_t id, struct rd *r) {
  uint16_t port = (uint16_t)rd_int(r, 2);
  if (!rd_done(r)) {
    refuse(id, T_TCP_CONNECT, "the payload is not a 2-byte port");
    return;
  }
  if (find_session(id)) {
    send_err(id, "channel %u is in use", id);
    return;
  }
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    send_i32(id, G_CONNECT_FAILED, errno);
    return;
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  int rc = connect(fd, (struct sockaddr *)&a, sizeof(a));
  if (rc < 0 && errno != EINPROGRESS) {
    int e = errno;
    close(fd);
    send_i32(id, G_CONNECT_FAILED, e);
    return;
  }
  struct session *s = new_session(id, K_TCP);
  if (!s) {
    close(fd);
    send_i32(id, G_CONNECT_FAILED, ENOMEM);
    return;
  }
  s->fd = fd;
  s->connecting = rc < 0;
  if (!s->connecting) send_frame(id, G_CONNECTED, NULL, 0);
}

static void tcp_flush(struct session *s) {
  while (buf_avail(&s->q) > 0) {
    ssize_t n = send(s->fd, s->q.p + s->q.off, buf_avail(&s->q), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      buf_consume(&s->q, (size_t)n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && errno == EAGAIN) {
      return;
    } else {
      tcp_closed(s);
      return;
    }
  }
  if (s->wr_eof_pending && !s->wr_shut) {
    shutdown(s->fd, SHUT_WR);
    s->wr_shut = 1;
    if (s->rd_eof) tcp_closed(s);
  }
}

static void tcp_event(struct session *s, short rev) {
  if (s->connecting) {
    int err = 0;
    socklen_t l = sizeof(err);
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    if (err) {
      send_i32(s->id, G_CONNECT_FAILED, err);
      session_end(s);
      return;
    }
    s->connecting = 0;
    send_frame(s->id, G_CONNECTED, NULL, 0);
    tcp_flush(s);
    return;
  }
  if (!s->rd_eof && (rev & (POLLIN | POLLHUP | POLLERR))) {
    unsigned char b[CHUNK];
    ssize_t n = read(s->fd, b, sizeof(b));
    if (n > 0) {
      send_frame(s->id, G_TCP_DATA, b, (size_t)n);
      explicit_bzero(b, (size_t)n);
    } else if (n == 0) {
      s->rd_eof = 1;
      send_frame(s->id, G_TCP_EOF, NULL, 0);
      if (s->wr_shut) {
        tcp_closed(s);
        return;
      }
    } else if (errno != EAGAIN && errno != EINTR) {
      tcp_closed(s);
      return;
    }
  }
  if (!s->dead && (rev & POLLOUT)) tcp_flush(s);
}

/* ---- file requests ------------------------------------------------------------------------ */

static void do_put_file(uint32_t id, struct rd *r) {
  mode_t mode = (mode_t)rd_int(r, 4) & 07777;
  const char *rel = rd_str(r);
  char path[PATH_MAX];
  /* The file's bytes are the rest of the payload, whatever it holds. */
  if (r->bad) {
    refuse(id, T_PUT_FILE, "no mode, or a path without its NUL");
    return;
  }
  if (root_path(rel, path, sizeof(path)) < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    return;
  }
  if (mkdir_parent(path) < 0 || write_atomic(path, r->p, r->n, mode, 0) < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    return;
  }
  send_frame(id, G_OK, NULL, 0);
}

/* GET_FILE streams from the event loop (file_pump) so a large file obeys the output high water
 * mark like any session. */
static void do_get_file(uint32_t id, struct rd *r) {
  const char *rel = rd_str(r);
  char path[PATH_MAX];
  struct stat st;
  if (!rd_done(r)) {
    refuse(id, T_GET_FILE, "the payload is not one NUL-terminated path");
    return;
  }
  if (root_path(rel, path, sizeof(path)) < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    return;
  }
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    return;
  }
  if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    close(fd);
    send_err(id, "%s: %s", rel, strerror(EISDIR));
    return;
  }
  struct session *s = new_session(id, K_FILE);
  if (!s) {
    close(fd);
    send_err(id, "out of memory");
    return;
  }
  s->fd = fd;
}

static int file_pump(void) {
  int pending = 0;
  for (size_t i = 0; i < g_nsess; i++) {
    struct session *s = g_sess[i];
    if (s->dead || s->kind != K_FILE) continue;
    for (int k = 0; k < 16 && !s->dead && out_has_room(); k++) {
      unsigned char b[CHUNK];
      ssize_t n = read(s->fd, b, sizeof(b));
      if (n > 0) {
        send_frame(s->id, G_FILE_DATA, b, (size_t)n);
        explicit_bzero(b, (size_t)n);
      } else if (n == 0) {
        send_frame(s->id, G_OK, NULL, 0);
        session_end(s);
      } else if (errno != EINTR) {
        send_err(s->id, "read: %s", strerror(errno));
        session_end(s);
      }
    }
    pending |= !s->dead;
  }
  return pending;
}

static void do_replace_dir(uint32_t id, struct rd *r) {
  const char *rel = rd_str(r);
  size_t count = (size_t)rd_int(r, 4);
  char dir[PATH_MAX];
  if (r->bad) {
    refuse(id, T_REPLACE_DIR, "no dir string or no count");
    return;
  }
  /* Each file takes at least a NUL and its u32 length: a count the payload cannot hold is refused
   * before anything is allocated for it. */
  if (count > r->n / 5) {
    refuse(id, T_REPLACE_DIR, "more files announced than the payload holds");
    return;
  }
  if (root_path(rel, dir, sizeof(dir)) < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    return;
  }
  const char **names = calloc(count + 1, sizeof(char *));
  const unsigned char **datas = calloc(count + 1, sizeof(char *));
  size_t *lens = calloc(count + 1, sizeof(size_t));
  if (!names || !datas || !lens) {
    send_err(id, "out of memory");
    goto out;
  }
  /* Validate the whole set before touching the directory. */
  for (size_t i = 0; i < count; i++) {
    names[i] = rd_str(r);
    lens[i] = (size_t)rd_int(r, 4);
    if (r->bad || lens[i] > r->n) {
      refuse(id, T_REPLACE_DIR, "a file runs past the end of the payload");
      goto out;
    }
    datas[i] = r->p;
    r->p += lens[i];
    r->n -= lens[i];
    if (!*names[i] || strchr(names[i], '/') || !strcmp(names[i], ".") || !strcmp(names[i], "..")) {
      send_err(id, "invalid file name '%s'", names[i]);
      goto out;
    }
  }
  if (!rd_done(r)) {
    refuse(id, T_REPLACE_DIR, "bytes after the last file");
    goto out;
  }
  if (mkdir_p(dir) < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    goto out;
  }
  /* New files are renamed in before stale ones go, so a name in both sets never disappears. A
   * replaced file's old value is wiped once the new one is in place (stale ones: by clear_dir). */
  for (size_t i = 0; i < count; i++) {
    char path[PATH_MAX];
    if (path_join(path, sizeof(path), dir, names[i]) < 0) {
      send_err(id, "%s/%s: %s", rel, names[i], strerror(errno));
      goto out;
    }
    int old = open(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (write_atomic(path, datas[i], lens[i], 0440, 1) < 0) {
      send_err(id, "%s/%s: %s", rel, names[i], strerror(errno));
      if (old >= 0) close(old);
      goto out;
    }
    wipe_fd(old);
    if (old >= 0) close(old);
  }
  if (clear_dir(dir, names, count) < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    goto out;
  }
  send_frame(id, G_OK, NULL, 0);
out:
  free(names);
  free(datas);
  free(lens);
}

/* ---- system requests ---------------------------------------------------------------------- */

static void do_hello(uint32_t id, struct rd *r) {
  uint64_t ns = rd_int(r, 8);
  if (!rd_done(r)) {
    refuse(id, T_HELLO, "the payload is not an 8-byte time");
    return;
  }
  /* A new connection: every channel of the previous one is forgotten (PROTOCOL.md), and so is
   * the sealing key: the new host asks for its own. */
  for (size_t i = 0; i < g_nsess; i++)
    if (!g_sess[i]->dead) session_end(g_sess[i]);
  forget_key();
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  long long diff = (long long)ns - ((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
  /* In test mode the "guest" is the host itself: never step the host's clock. */
  if (!g_unix_mode && (diff > CLOCK_STEP_NS || diff < -CLOCK_STEP_NS)) {
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL), .tv_nsec = (long)(ns % 1000000000ULL)};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) logmsg("clock_settime: %s", strerror(errno));
  }
  struct utsname u;
  char host[256] = "", boot[64] = "", reply[512];
  uname(&u);
  gethostname(host, sizeof(host) - 1);
  read_small("/proc/sys/kernel/random/boot_id", boot, sizeof(boot));
  boot[strcspn(boot, "\n")] = 0;
  int n = snprintf(reply, sizeof(reply), "%s%c%s%c%s%c", u.release, 0, host, 0, boot, 0);
  send_frame(id, G_OK, reply, (size_t)n);
}

static void do_health(uint32_t id) {
  char up[128], load[128], mem[4096], out[512];
  long total = 0, avail = 0;
  int procs = 0;
  read_small("/proc/uptime", up, sizeof(up));
  read_small("/proc/loadavg", load, sizeof(load));
  read_small("/proc/meminfo", mem, sizeof(mem));
  for (char *line = mem; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
    sscanf(line, "MemTotal: %ld", &total);
    sscanf(line, "MemAvailable: %ld", &avail);
  }
  DIR *d = opendir("/proc");
  for (struct dirent *e; d && (e = readdir(d));) procs += e->d_name[0] >= '1' && e->d_name[0] <= '9';
  if (d) closedir(d);
  up[strcspn(up, " \n")] = 0;
  load[strcspn(load, " \n")] = 0;
  int n = snprintf(out, sizeof(out), "uptime=%s\nload1=%s\nmem_total_kb=%ld\nmem_available_kb=%ld\nprocs=%d\nidle_ms=%lld\n",
                   *up ? up : "0", *load ? load : "0", total, avail, procs, now_ms() - g_last_host_ms);
  send_frame(id, G_OK, out, (size_t)n);
}

static void do_set_identity(uint32_t id, struct rd *r) {
  const char *host = rd_str(r), *mid = rd_str(r);
  if (!rd_done(r)) {
    refuse(id, T_SET_IDENTITY, "the payload is not two NUL-terminated strings");
    return;
  }
  size_t hl = strlen(host);
  if (!hl || hl > 64 || strpbrk(host, "/ \t\n")) {
    send_err(id, "invalid hostname '%s'", host);
    return;
  }
  if (strlen(mid) != 32 || strspn(mid, "0123456789abcdef") != 32) {
    send_err(id, "invalid machine-id '%s'", mid);
    return;
  }
  if (sethostname(host, hl) < 0) {
    send_err(id, "sethostname: %s", strerror(errno));
    return;
  }
  char etc[PATH_MAX], path[PATH_MAX], text[512];
  root_path("etc", etc, sizeof(etc));
  if (mkdir_p(etc) < 0) {
    send_err(id, "/etc: %s", strerror(errno));
    return;
  }
  struct { const char *name, *fmt; mode_t mode; } files[] = {
    {"hostname", "%s\n", 0644},
    {"machine-id", "%s\n", 0444},
    {"hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n", 0644},
  };
  for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
    int n = snprintf(text, sizeof(text), files[i].fmt, i == 1 ? mid : host);
    if (path_join(path, sizeof(path), etc, files[i].name) < 0 ||
        write_atomic(path, text, (size_t)n, files[i].mode, 1) < 0) {
      send_err(id, "/etc/%s: %s", files[i].name, strerror(errno));
      return;
    }
  }
  send_frame(id, G_OK, NULL, 0);
}

static void do_quiesce(uint32_t id, struct rd *r) {
  const char *rel = rd_str(r);
  char dir[PATH_MAX];
  if (!rd_done(r)) {
    refuse(id, T_QUIESCE, "the payload is not one NUL-terminated path");
    return;
  }
  if (root_path(rel, dir, sizeof(dir)) < 0) {
    send_err(id, "%s: %s", rel, strerror(errno));
    return;
  }
  /* Sealed frames that carried secrets may still sit in the port's receive buffers: without the
   * key they are noise. The next sealed frame needs a new KEY. */
  forget_key();
  /* A missing secrets dir holds no secrets: nothing to remove. Files are zeroed before they go
   * (rm_entry): their tmpfs pages are freed with whatever bytes they hold. */
  if (clear_dir(dir, NULL, 0) < 0 && errno != ENOENT) {
    send_err(id, "%s: %s", rel, strerror(errno));
    return;
  }
  sync();
  send_frame(id, G_OK, NULL, 0);
}

/* Runs /bin/busybox (of the initramfs, outside the root) and waits for it; `ip` returns at once,
 * so blocking the loop briefly is acceptable, but a hung one is killed after 10 s. */
/*
 * NET_CONFIG: a restored VM on a new NIC (a fork, a box moved to another node) takes its new MAC,
 * address and default route. Done with ioctls rather than `ip` processes: every process start costs
 * tens of milliseconds under TCG, and this sits on the path to a clone's first command.
 */
static int net_ioctl(int fd, unsigned long req, void *arg, const char *what, uint32_t id) {
  if (ioctl(fd, req, arg) == 0) return 0;
  send_err(id, "%s: %s", what, strerror(errno));
  return -1;
}

static void do_net_config(uint32_t id, struct rd *r) {
  char *ifc = (char *)rd_str(r), *cidr = (char *)rd_str(r), *gw = (char *)rd_str(r);
  /* Optional fourth string: the MAC (older hosts send three). */
  char *mac = r->n > 0 ? (char *)rd_str(r) : (char *)"";
  if (!rd_done(r)) {
    refuse(id, T_NET_CONFIG, "the payload is not three or four NUL-terminated strings");
    return;
  }
  if (!*ifc || !*cidr || !*gw || strlen(ifc) >= IFNAMSIZ) {
    refuse(id, T_NET_CONFIG, "an empty string or an interface name that is too long");
    return;
  }
  char addr[64];
  snprintf(addr, sizeof(addr), "%s", cidr);
  char *slash = strchr(addr, '/');
  int prefix = slash ? atoi(slash + 1) : 32;
  if (slash) *slash = 0;
  struct in_addr ip, gwip;
  unsigned char hw[6];
  if (inet_pton(AF_INET, addr, &ip) != 1 || inet_pton(AF_INET, gw, &gwip) != 1 || prefix < 0 || prefix > 32 ||
      (*mac && sscanf(mac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &hw[0], &hw[1], &hw[2], &hw[3], &hw[4], &hw[5]) != 6)) {
    send_err(id, "NET_CONFIG: bad address, gateway or MAC");
    return;
  }
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    send_err(id, "socket: %s", strerror(errno));
    return;
  }
  struct ifreq ifr;
  memset(&ifr, 0, sizeof(ifr));
  snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifc);
  if (net_ioctl(fd, SIOCGIFFLAGS, &ifr, "get flags", id) < 0) goto out;
  short flags = ifr.ifr_flags;
  /* Down first: a MAC can only change on a down interface, and its routes go with it. */
  ifr.ifr_flags = (short)(flags & ~IFF_UP);
  if (net_ioctl(fd, SIOCSIFFLAGS, &ifr, "set down", id) < 0) goto out;
  if (*mac) {
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, hw, 6);
    if (net_ioctl(fd, SIOCSIFHWADDR, &ifr, "set MAC", id) < 0) goto out;
  }
  /* SIOCSIFADDR replaces the interface's primary IPv4 address. */
  struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
  memset(&ifr.ifr_addr, 0, sizeof(ifr.ifr_addr));
  sin->sin_family = AF_INET;
  sin->sin_addr = ip;
  if (net_ioctl(fd, SIOCSIFADDR, &ifr, "set address", id) < 0) goto out;
  memset(&ifr.ifr_netmask, 0, sizeof(ifr.ifr_netmask));
  sin = (struct sockaddr_in *)&ifr.ifr_netmask;
  sin->sin_family = AF_INET;
  sin->sin_addr.s_addr = prefix ? htonl(0xffffffffu << (32 - prefix)) : 0;
  if (net_ioctl(fd, SIOCSIFNETMASK, &ifr, "set netmask", id) < 0) goto out;
  ifr.ifr_flags = (short)(flags | IFF_UP | IFF_RUNNING);
  if (net_ioctl(fd, SIOCSIFFLAGS, &ifr, "set up", id) < 0) goto out;
  struct rtentry rt;
  memset(&rt, 0, sizeof(rt));
  ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
  ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
  ((struct sockaddr_in *)&rt.rt_gateway)->sin_family = AF_INET;
  ((struct sockaddr_in *)&rt.rt_gateway)->sin_addr = gwip;
  rt.rt_flags = RTF_UP | RTF_GATEWAY;
  rt.rt_dev = ifc;
  if (ioctl(fd, SIOCADDRT, &rt) < 0 && errno != EEXIST) {
    send_err(id, "add default route: %s", strerror(errno));
    goto out;
  }
  send_frame(id, G_OK, NULL, 0);
out:
  close(fd);
}

/* ---- sealed frames ------------------------------------------------------------------------ */

/*
 * Frames that carry secrets (EXEC with its environment, REPLACE_DIR with the secret files) arrive
 * SEALED: ChaCha20 under a key this agent drew (KEY) and handed to the host over the guest→host
 * direction. The virtio console driver reuses its receive buffers for the VM's whole life, so the
 * bytes of a host frame stay in guest memory until a later frame happens to land in the same
 * buffer — hundreds of frames later — and a RAM snapshot would carry them. Sealed, those leftovers
 * are noise once the key is gone, and QUIESCE (before every snapshot) and HELLO forget it. The
 * guest→host buffers (the KEY reply among them) are freed once the host has read them: zeroed by
 * a kernel booted with init_on_free=1, left as they are otherwise. Confidentiality at rest is the
 * point, not integrity: the channel itself is the host's.
 */
static uint32_t le32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

#define ROTL(v, c) (((v) << (c)) | ((v) >> (32 - (c))))
#define QR(a, b, c, d) \
  (a += b, d ^= a, d = ROTL(d, 16), c += d, b ^= c, b = ROTL(b, 12), a += b, d ^= a, d = ROTL(d, 8), c += d, b ^= c, b = ROTL(b, 7))

/* ChaCha20 (RFC 8439) keystream XORed over p, block counter from 0: the layout of OpenSSL's
 * `chacha20` with a 16-byte IV of four zero bytes and the nonce. */
static void chacha20_xor(unsigned char *p, size_t n, const unsigned char key[32], const unsigned char nonce[12]) {
  uint32_t st[16] = {0x61707865, 0x3320646e, 0x79622d32, 0x6b206574}, x[16];
  for (int i = 0; i < 8; i++) st[4 + i] = le32(key + 4 * i);
  st[12] = 0;
  for (int i = 0; i < 3; i++) st[13 + i] = le32(nonce + 4 * i);
  for (size_t off = 0; off < n; off += 64, st[12]++) {
    memcpy(x, st, sizeof(x));
    for (int r = 0; r < 10; r++) {
      QR(x[0], x[4], x[8], x[12]), QR(x[1], x[5], x[9], x[13]), QR(x[2], x[6], x[10], x[14]), QR(x[3], x[7], x[11], x[15]);
      QR(x[0], x[5], x[10], x[15]), QR(x[1], x[6], x[11], x[12]), QR(x[2], x[7], x[8], x[13]), QR(x[3], x[4], x[9], x[14]);
    }
    for (int i = 0; i < 16; i++) x[i] += st[i];
    for (size_t i = 0; i < 64 && off + i < n; i++) p[off + i] ^= (unsigned char)(x[i / 4] >> (8 * (i % 4)));
  }
  explicit_bzero(st, sizeof(st));
  explicit_bzero(x, sizeof(x));
}

static void do_key(uint32_t id) {
  if (getrandom(g_key, sizeof(g_key), 0) != (ssize_t)sizeof(g_key)) {
    forget_key();
    send_err(id, "getrandom: %s", strerror(errno));
    return;
  }
  g_have_key = 1;
  send_frame(id, G_OK, g_key, sizeof(g_key));
}

static void handle_frame(uint32_t ch, uint8_t type, const unsigned char *p, size_t n);

/* SEALED: nonce (12 bytes), then the inner frame's type and payload, encrypted. Opened in place
 * (in the input buffer, which is zeroed once the frame is handled) and handled as that frame. */
static void do_sealed(uint32_t ch, unsigned char *p, size_t n) {
  if (!g_have_key) {
    send_err(ch, "sealed frame without a key (KEY first)");
    return;
  }
  if (n < 13) {
    refuse(ch, T_SEALED, "the payload is shorter than a nonce and a frame type");
    return;
  }
  chacha20_xor(p + 12, n - 12, g_key, p);
  if (p[12] == T_SEALED || p[12] == T_KEY) {
    send_err(ch, "a sealed frame may not hold frame type 0x%02x", p[12]);
    return;
  }
  handle_frame(ch, p[12], p + 13, n - 13);
}

/* ---- host frames -------------------------------------------------------------------------- */

/* Session frames are checked before the session is looked up: a malformed one is refused whether
 * or not its session exists. */
static void handle_frame(uint32_t ch, uint8_t type, const unsigned char *p, size_t n) {
  struct rd r = {p, n, 0};
  struct session *s = find_session(ch);
  if (type != T_HEALTH) g_last_host_ms = now_ms();
  switch (type) {
  case T_HELLO: do_hello(ch, &r); break;
  case T_EXEC: do_exec(ch, &r); break;
  case T_STDIN:
    if (s && s->kind == K_EXEC && stdin_fd(s) >= 0 && !s->stdin_eof) {
      buf_put(&s->q, p, n);
      exec_flush_stdin(s);
    }
    break;
  case T_STDIN_EOF:
    if (n != 0) refuse(ch, type, "the type carries no payload");
    else if (s && s->kind == K_EXEC && !s->tty) {
      s->stdin_eof = 1;
      if (buf_avail(&s->q) == 0) xclose(&s->in_fd);
    }
    break;
  case T_SIGNAL:
    if (n != 1 || p[0] < 1 || p[0] >= NSIG) refuse(ch, type, "the payload is not one signal number");
    else if (s && s->kind == K_EXEC) kill(s->pid, p[0]);
    break;
  case T_RESIZE: {
    /* Two statements: the evaluation order inside one initializer list is unspecified. */
    unsigned short cols = (unsigned short)rd_int(&r, 2);
    unsigned short rows = (unsigned short)rd_int(&r, 2);
    struct winsize ws = {.ws_col = cols, .ws_row = rows};
    if (!rd_done(&r)) refuse(ch, type, "the payload is not two 2-byte sizes");
    else if (s && s->kind == K_EXEC && s->tty && s->out_fd >= 0) ioctl(s->out_fd, TIOCSWINSZ, &ws);
    break;
  }
  case T_TCP_CONNECT: do_tcp_connect(ch, &r); break;
  case T_TCP_DATA:
    if (s && s->kind == K_TCP && !s->wr_eof_pending) {
      buf_put(&s->q, p, n);
      if (!s->connecting) tcp_flush(s);
    }
    break;
  case T_TCP_EOF:
    if (n != 0) refuse(ch, type, "the type carries no payload");
    else if (s && s->kind == K_TCP) {
      s->wr_eof_pending = 1;
      if (!s->connecting) tcp_flush(s);
    }
    break;
  case T_CLOSE:
    if (n != 0) refuse(ch, type, "the type carries no payload");
    else if (s) session_end(s);
    break;
  case T_PUT_FILE: do_put_file(ch, &r); break;
  case T_GET_FILE: do_get_file(ch, &r); break;
  case T_REPLACE_DIR: do_replace_dir(ch, &r); break;
  case T_HEALTH:
    if (n != 0) refuse(ch, type, "the type carries no payload");
    else do_health(ch);
    break;
  case T_SET_IDENTITY: do_set_identity(ch, &r); break;
  case T_QUIESCE: do_quiesce(ch, &r); break;
  case T_NET_CONFIG: do_net_config(ch, &r); break;
  case T_KEY:
    if (n != 0) refuse(ch, type, "the type carries no payload");
    else do_key(ch);
    break;
  /* The payload is this agent's own input buffer: opened where it lies. */
  case T_SEALED: do_sealed(ch, (unsigned char *)p, n); break;
  default: send_err(ch, "unknown frame type 0x%02x", type); break;
  }
}

static void parse_frames(void) {
  while (buf_avail(&g_in) >= HDR_LEN) {
    const unsigned char *h = g_in.p + g_in.off;
    uint32_t len = h[0] | h[1] << 8 | h[2] << 16 | (uint32_t)h[3] << 24;
    uint32_t ch = h[4] | h[5] << 8 | h[6] << 16 | (uint32_t)h[7] << 24;
    if (len > MAX_PAYLOAD) {
      /* No way to find the next frame boundary: drop what we have and wait for a new HELLO. */
      logmsg("frame of %u bytes exceeds the limit, input dropped", len);
      if (g_unix_mode) exit(1);
      buf_clear(&g_in);
      return;
    }
    if (buf_avail(&g_in) < HDR_LEN + len) return;
#ifdef __SANITIZE_ADDRESS__
    /* In a sanitizer build (the fuzz test's) each payload ends where its allocation ends, so a
     * read past a frame's end is reported instead of landing in the bytes after it. One byte
     * leads: AddressSanitizer gives malloc(0) a byte that reads go unreported on. */
    unsigned char *block = malloc(len + 1);
    if (block) {
      memcpy(block + 1, h + HDR_LEN, len);
      handle_frame(ch, h[8], block + 1, len);
    }
    free(block);
#else
    handle_frame(ch, h[8], h + HDR_LEN, len);
#endif
    buf_consume(&g_in, HDR_LEN + len);
  }
}

/* Reads what the host sent; in port mode EOF/EIO mean that no host is attached right now. */
static void port_read(void) {
  if (buf_reserve(&g_in, 256u << 10) < 0) return;
  ssize_t n = read(g_port, g_in.p + g_in.len, g_in.cap - g_in.len);
  if (n > 0) {
    if (!g_connected) logmsg("host connected");
    g_connected = 1;
    g_in.len += (size_t)n;
    parse_frames();
  } else if (n < 0 && errno == EAGAIN) {
    g_connected = 1; /* a host is attached, it just has nothing to say */
  } else if (n < 0 && errno == EINTR) {
    return;
  } else {
    if (g_unix_mode) exit(0);
    host_gone();
    /* A partial frame of the previous host must not prefix the next one's HELLO. */
    buf_clear(&g_in);
  }
}

/* ---- main loop ---------------------------------------------------------------------------- */

static void on_sigchld(int sig) {
  (void)sig;
  int e = errno;
  ssize_t rc = write(g_sig_w, "c", 1);
  (void)rc;
  errno = e;
}

static void open_host(void) {
  if (g_unix_mode) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", g_port_path);
    g_port = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (g_port < 0 || connect(g_port, (struct sockaddr *)&a, sizeof(a)) < 0) {
      logmsg("%s: %s", g_port_path, strerror(errno));
      exit(1);
    }
    set_nonblock(g_port);
    g_connected = 1;
    return;
  }
  /* The port device may appear late (udev-less boot): wait for it, PID 1 must not give up. */
  for (int logged = 0; (g_port = open(g_port_path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)) < 0;) {
    if (!logged++) logmsg("%s: %s (waiting)", g_port_path, strerror(errno));
    usleep(100000);
  }
}

struct pref {
  struct session *s; /* NULL: the port or the signal pipe */
  int fd;
};

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--port") && i + 1 < argc) g_port_path = argv[++i];
    else if (!strcmp(argv[i], "--unix") && i + 1 < argc) g_port_path = argv[++i], g_unix_mode = 1;
    else if (!strcmp(argv[i], "--root") && i + 1 < argc) g_root = argv[++i];
    else {
      logmsg("usage: %s (--port DEVICE | --unix PATH) [--root DIR]", argv[0]);
      return 2;
    }
  }
  if (!g_port_path || !*g_root) {
    logmsg("--port or --unix is required");
    return 2;
  }
  /* Keep 0-2 taken so no pipe we create lands there and gets clobbered by a child's dup2. */
  int null_fd;
  while ((null_fd = open("/dev/null", O_RDWR)) >= 0 && null_fd <= 2) {}
  if (null_fd > 2) close(null_fd);

  int sp[2];
  if (pipe2(sp, O_CLOEXEC | O_NONBLOCK) < 0) return 1;
  g_sig_r = sp[0];
  g_sig_w = sp[1];
  struct sigaction sa = {.sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGCHLD, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  open_host();
  g_last_host_ms = now_ms();
  long long last_try = 0;
  struct pollfd *pfd = NULL;
  struct pref *ref = NULL;
  size_t pcap = 0;

  for (;;) {
    if (pcap < 2 + 3 * g_nsess) {
      pcap = 2 + 3 * g_nsess + 64;
      pfd = realloc(pfd, pcap * sizeof(*pfd));
      ref = realloc(ref, pcap * sizeof(*ref));
      if (!pfd || !ref) {
        logmsg("out of memory");
        sleep(1);
        pcap = 0;
        continue;
      }
    }
    size_t np = 0;
#define ADD(S, FD, EV) (pfd[np] = (struct pollfd){.fd = (FD), .events = (EV)}, ref[np++] = (struct pref){(S), (FD)})
    ADD(NULL, g_sig_r, POLLIN);
    /* A disconnected virtio port polls as POLLHUP forever: leave it out and retry on a timer. */
    if (g_connected) ADD(NULL, g_port, POLLIN | (buf_avail(&g_out) ? POLLOUT : 0));
    int room = out_has_room(), files = 0;
    for (size_t i = 0; i < g_nsess; i++) {
      struct session *s = g_sess[i];
      if (s->dead) continue;
      if (s->kind == K_EXEC) {
        /* Output fds are left out entirely when the host is behind: POLLHUP would spin. */
        short ev = (room && !s->out_eof ? POLLIN : 0) | (s->tty && buf_avail(&s->q) && !s->out_eof ? POLLOUT : 0);
        if (s->out_fd >= 0 && ev) ADD(s, s->out_fd, ev);
        if (s->err_fd >= 0 && room) ADD(s, s->err_fd, POLLIN);
        if (s->in_fd >= 0 && buf_avail(&s->q)) ADD(s, s->in_fd, POLLOUT);
      } else if (s->kind == K_TCP) {
        short ev = s->connecting ? POLLOUT : (short)((!s->rd_eof && room ? POLLIN : 0) | (buf_avail(&s->q) ? POLLOUT : 0));
        if (ev) ADD(s, s->fd, ev);
      } else {
        files = 1;
      }
    }
#undef ADD
    int timeout = -1;
    if (!g_connected) timeout = RECONNECT_MS;
    if (files && room) timeout = 0;
    int nready = poll(pfd, np, timeout);
    if (nready < 0 && errno != EINTR) {
      logmsg("poll: %s", strerror(errno));
      usleep(RECONNECT_MS * 1000);
    }
    for (size_t i = 0; nready > 0 && i < np; i++) {
      short rev = pfd[i].revents;
      struct session *s = ref[i].s;
      if (!rev) continue;
      if (!s) {
        if (ref[i].fd == g_sig_r) {
          char b[64];
          while (read(g_sig_r, b, sizeof(b)) > 0) {}
        } else if (g_connected) {
          if (rev & POLLOUT) port_flush();
          if (g_connected && (rev & (POLLIN | POLLHUP | POLLERR))) port_read();
        }
        continue;
      }
      if (s->dead) continue;
      if (s->kind == K_TCP) {
        tcp_event(s, rev);
      } else if (ref[i].fd == s->out_fd) {
        if (rev & POLLOUT) exec_flush_stdin(s);
        if (rev & (POLLIN | POLLHUP | POLLERR)) exec_read(s, &s->out_fd, G_STDOUT);
        if (s->out_eof) buf_free(&s->q); /* nobody can read the terminal's input any more */
      } else if (ref[i].fd == s->err_fd) {
        exec_read(s, &s->err_fd, G_STDERR);
      } else if (ref[i].fd == s->in_fd) {
        exec_flush_stdin(s);
      }
    }
    /* Reaping after the reads keeps output ordered before EXIT; waitpid is cheap enough to run
     * every iteration, which also covers a SIGCHLD that raced the self-pipe. */
    reap_children();
    file_pump();
    if (!g_connected && now_ms() - last_try >= RECONNECT_MS) {
      last_try = now_ms();
      port_read();
    }
    sweep_sessions();
  }
}
