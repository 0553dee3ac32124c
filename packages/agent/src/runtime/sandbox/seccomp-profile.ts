/**
 * The seccomp filter of every sandbox box: an allow-list with the semantics of Docker's default
 * profile for x86_64 (its `defaultAction` errno EPERM, its syscall groups, its argument rules for
 * `clone`, `clone3`, `personality` and `socket`), resolved for the fixed capability set boxes get
 * (BOX_CAPABILITIES: no CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_BPF, CAP_SYS_TIME…), plus io_uring
 * blocked as Docker does since version 25.
 *
 * Why a filter at all when the box already runs in its own user namespace without CAP_SYS_ADMIN:
 * capabilities only say what the box may do to objects its namespaces own. Box code can still
 * create a *nested* user namespace, where it holds every capability, and from there reach kernel
 * code that is otherwise root-only — mounting filesystems (each filesystem's parser), new network
 * namespaces (netfilter, packet sockets), setns into them. io_uring, bpf, keyrings, userfaultfd and
 * perf events need no capability at all, and are where a large share of recent kernel privilege
 * escalations were found. On a shared node a kernel bug is a way out of every box at once, so
 * syscalls a development box does not need are refused before they reach that code.
 *
 * The list is the reviewed artefact: a syscall is added here, in its group, with the reason it is
 * safe to expose. Names this host's libseccomp does not know are skipped by crun (they then fail
 * with EPERM, like any syscall not listed).
 */

/** One rule of an OCI `linux.seccomp` profile. */
export interface SeccompRule {
  /** Syscall names the rule applies to. */
  names: string[];
  /** What the filter does on a match. */
  action: 'SCMP_ACT_ALLOW' | 'SCMP_ACT_ERRNO';
  /** errno returned by SCMP_ACT_ERRNO. */
  errnoRet?: number;
  /** Argument conditions, all of which must hold. */
  args?: Array<{ index: number; value: number; valueTwo?: number; op: 'SCMP_CMP_EQ' | 'SCMP_CMP_NE' | 'SCMP_CMP_MASKED_EQ' }>;
}

/** The OCI `linux.seccomp` object. */
export interface SeccompProfile {
  /** Action for every syscall no rule matches. */
  defaultAction: 'SCMP_ACT_ERRNO';
  /** errno of the default action. */
  defaultErrnoRet: number;
  /** Native architecture and the compat ones the kernel also accepts on it. */
  architectures: string[];
  /** Rules, evaluated by libseccomp (the most permissive matching action wins). */
  syscalls: SeccompRule[];
}

const EPERM = 1;
const ENOSYS = 38;

/**
 * Namespace flags of clone(2): CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
 * CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET. clone is allowed only with none of them set.
 */
export const CLONE_NAMESPACE_FLAGS = 0x7e020000;

/** Allowed syscalls, by what they are for. */
export const SECCOMP_ALLOW_GROUPS: Record<string, string[]> = {
  /** Process life cycle. fork/vfork/clone-without-namespaces are how every shell starts programs. */
  processes: [
    'execve', 'execveat', 'exit', 'exit_group', 'fork', 'vfork', 'wait4', 'waitid', 'waitpid',
    'kill', 'tkill', 'tgkill', 'pidfd_open', 'pidfd_send_signal', 'process_mrelease',
    'restart_syscall', 'set_tid_address', 'set_robust_list', 'get_robust_list', 'rseq',
    'arch_prctl', 'modify_ldt', 'set_thread_area', 'get_thread_area', 'prctl', 'seccomp',
    'capget', 'capset', 'getpid', 'getppid', 'gettid', 'getpgid', 'getpgrp', 'setpgid', 'getsid', 'setsid',
  ],
  /** Identity inside the box's user namespace (apt's _apt user, su, sshd privilege separation). */
  credentials: [
    'getuid', 'getuid32', 'geteuid', 'geteuid32', 'getgid', 'getgid32', 'getegid', 'getegid32',
    'getresuid', 'getresuid32', 'getresgid', 'getresgid32', 'getgroups', 'getgroups32',
    'setuid', 'setuid32', 'setgid', 'setgid32', 'setreuid', 'setreuid32', 'setregid', 'setregid32',
    'setresuid', 'setresuid32', 'setresgid', 'setresgid32', 'setgroups', 'setgroups32',
    'setfsuid', 'setfsuid32', 'setfsgid', 'setfsgid32',
  ],
  /** Signals and timers. */
  signals: [
    'rt_sigaction', 'rt_sigpending', 'rt_sigprocmask', 'rt_sigqueueinfo', 'rt_sigreturn', 'rt_sigsuspend',
    'rt_sigtimedwait', 'rt_sigtimedwait_time64', 'rt_tgsigqueueinfo', 'sigaltstack', 'sigprocmask', 'sigreturn',
    'signalfd', 'signalfd4', 'pause', 'alarm', 'getitimer', 'setitimer',
    'timer_create', 'timer_delete', 'timer_getoverrun', 'timer_gettime', 'timer_gettime64', 'timer_settime', 'timer_settime64',
    'timerfd_create', 'timerfd_gettime', 'timerfd_gettime64', 'timerfd_settime', 'timerfd_settime64',
  ],
  /** Clocks: reading them, and adjtimex/clock_adjtime, which only read without CAP_SYS_TIME. */
  time: [
    'clock_getres', 'clock_getres_time64', 'clock_gettime', 'clock_gettime64', 'clock_nanosleep', 'clock_nanosleep_time64',
    'gettimeofday', 'time', 'times', 'nanosleep', 'adjtimex', 'clock_adjtime', 'clock_adjtime64',
  ],
  /** Memory management (mlock is bounded by RLIMIT_MEMLOCK and the memory cgroup). */
  memory: [
    'brk', 'mmap', 'mmap2', 'munmap', 'mremap', 'mprotect', 'madvise', 'mincore', 'msync', 'remap_file_pages',
    'mlock', 'mlock2', 'mlockall', 'munlock', 'munlockall', 'membarrier', 'memfd_create', 'memfd_secret',
    'pkey_alloc', 'pkey_free', 'pkey_mprotect',
  ],
  /** Scheduling within the box's own CPU quota. */
  scheduling: [
    'sched_getaffinity', 'sched_setaffinity', 'sched_getattr', 'sched_setattr', 'sched_getparam', 'sched_setparam',
    'sched_get_priority_max', 'sched_get_priority_min', 'sched_getscheduler', 'sched_setscheduler',
    'sched_rr_get_interval', 'sched_rr_get_interval_time64', 'sched_yield', 'getpriority', 'setpriority',
    'ioprio_get', 'ioprio_set', 'getcpu', 'getrlimit', 'setrlimit', 'ugetrlimit', 'prlimit64', 'getrusage', 'sysinfo', 'uname',
  ],
  /** Futexes: every threaded program. */
  futex: ['futex', 'futex_time64', 'futex_waitv', 'futex_wait', 'futex_wake', 'futex_requeue'],
  /** Files and directories on the box's own filesystems. */
  files: [
    'open', 'openat', 'openat2', 'creat', 'close', 'close_range', 'read', 'readv', 'pread64', 'preadv', 'preadv2',
    'write', 'writev', 'pwrite64', 'pwritev', 'pwritev2', 'lseek', '_llseek', 'readahead',
    'sendfile', 'sendfile64', 'splice', 'tee', 'vmsplice', 'copy_file_range',
    'fsync', 'fdatasync', 'sync', 'syncfs', 'sync_file_range', 'fadvise64', 'fadvise64_64', 'fallocate',
    'truncate', 'truncate64', 'ftruncate', 'ftruncate64', 'flock', 'fcntl', 'fcntl64', 'ioctl',
    'dup', 'dup2', 'dup3', 'pipe', 'pipe2',
    'stat', 'stat64', 'lstat', 'lstat64', 'fstat', 'fstat64', 'fstatat64', 'newfstatat', 'statx',
    'statfs', 'statfs64', 'fstatfs', 'fstatfs64', 'access', 'faccessat', 'faccessat2',
    'getcwd', 'chdir', 'fchdir', 'getdents', 'getdents64', 'mkdir', 'mkdirat', 'rmdir',
    'link', 'linkat', 'symlink', 'symlinkat', 'unlink', 'unlinkat', 'readlink', 'readlinkat',
    'rename', 'renameat', 'renameat2', 'mknod', 'mknodat', 'umask',
    'chmod', 'fchmod', 'fchmodat', 'fchmodat2', 'chown', 'chown32', 'fchown', 'fchown32', 'fchownat', 'lchown', 'lchown32',
    'utime', 'utimes', 'utimensat', 'utimensat_time64', 'futimesat', 'name_to_handle_at', 'cachestat',
    'getxattr', 'lgetxattr', 'fgetxattr', 'setxattr', 'lsetxattr', 'fsetxattr',
    'listxattr', 'llistxattr', 'flistxattr', 'removexattr', 'lremovexattr', 'fremovexattr',
    'inotify_init', 'inotify_init1', 'inotify_add_watch', 'inotify_rm_watch', 'fanotify_mark',
  ],
  /** Event loops and POSIX asynchronous I/O (not io_uring: see the deny notes below). */
  polling: [
    'select', '_newselect', 'pselect6', 'pselect6_time64', 'poll', 'ppoll', 'ppoll_time64',
    'epoll_create', 'epoll_create1', 'epoll_ctl', 'epoll_ctl_old', 'epoll_wait', 'epoll_wait_old', 'epoll_pwait', 'epoll_pwait2',
    'eventfd', 'eventfd2', 'io_setup', 'io_destroy', 'io_submit', 'io_cancel', 'io_getevents', 'io_pgetevents', 'io_pgetevents_time64',
  ],
  /** Sockets in the box's own network namespace (socket itself is a rule of its own: no vsock). */
  network: [
    'socketpair', 'socketcall', 'bind', 'listen', 'accept', 'accept4', 'connect', 'shutdown',
    'getsockname', 'getpeername', 'getsockopt', 'setsockopt',
    'send', 'sendto', 'sendmsg', 'sendmmsg', 'recv', 'recvfrom', 'recvmsg', 'recvmmsg', 'recvmmsg_time64',
  ],
  /** System V and POSIX IPC, in the box's own IPC namespace. */
  ipc: [
    'ipc', 'msgctl', 'msgget', 'msgrcv', 'msgsnd', 'semctl', 'semget', 'semop', 'semtimedop', 'semtimedop_time64',
    'shmat', 'shmctl', 'shmdt', 'shmget',
    'mq_getsetattr', 'mq_notify', 'mq_open', 'mq_timedreceive', 'mq_timedreceive_time64', 'mq_timedsend', 'mq_timedsend_time64', 'mq_unlink',
  ],
  /** Randomness, and landlock: a process may always restrict itself further. */
  misc: ['getrandom', 'landlock_add_rule', 'landlock_create_ruleset', 'landlock_restrict_self', 'map_shadow_stack'],
  /**
   * Debuggers (gdb, strace) on the box's own processes: Docker allows these from kernel 4.8 on,
   * where ptrace can no longer be used to get around seccomp.
   */
  debugging: ['ptrace', 'process_vm_readv', 'process_vm_writev'],
  /** chroot: boxes hold CAP_SYS_CHROOT (package builds, debootstrap in a box). */
  chroot: ['chroot'],
};

/**
 * personality(2) values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32 and
 * the 0xffffffff query. Others (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC) weaken exploit mitigations.
 */
export const PERSONALITY_ALLOWED = [0x0, 0x8, 0x20000, 0x20008, 0xffffffff];

/** AF_VSOCK: a channel to the host's hypervisor side, never a box's business. */
const AF_VSOCK = 40;

/**
 * Not in the list, on purpose (they fail with EPERM): unshare, setns, mount, umount2, pivot_root,
 * open_tree, move_mount, fsopen/fsmount/fsconfig/fspick, mount_setattr (namespaces and mounts:
 * CAP_SYS_ADMIN territory even in a nested user namespace); io_uring_setup/enter/register (a large,
 * capability-free kernel attack surface that also bypasses this filter for the I/O it performs);
 * bpf, perf_event_open, userfaultfd, keyctl/add_key/request_key (kernel keyrings are not
 * namespaced), kexec, modules, swap, reboot, quotactl, acct, syslog, settimeofday/clock_settime,
 * iopl/ioperm, open_by_handle_at, kcmp, pidfd_getfd, process_madvise, fanotify_init, lookup_dcookie,
 * sethostname/setdomainname, vhangup, mbind/set_mempolicy and the obsolete ones.
 */
export function boxSeccompProfile(): SeccompProfile {
  return {
    defaultAction: 'SCMP_ACT_ERRNO',
    defaultErrnoRet: EPERM,
    architectures: ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32'],
    syscalls: [
      { names: Object.values(SECCOMP_ALLOW_GROUPS).flat(), action: 'SCMP_ACT_ALLOW' },
      { names: ['socket'], action: 'SCMP_ACT_ALLOW', args: [{ index: 0, value: AF_VSOCK, op: 'SCMP_CMP_NE' }] },
      ...PERSONALITY_ALLOWED.map((value): SeccompRule => ({ names: ['personality'], action: 'SCMP_ACT_ALLOW', args: [{ index: 0, value, op: 'SCMP_CMP_EQ' }] })),
      // clone with no namespace flag: threads and processes, never a new user (or other) namespace.
      { names: ['clone'], action: 'SCMP_ACT_ALLOW', args: [{ index: 0, value: CLONE_NAMESPACE_FLAGS, valueTwo: 0, op: 'SCMP_CMP_MASKED_EQ' }] },
      // clone3 passes its flags in memory, which seccomp cannot inspect: ENOSYS makes glibc fall back to clone.
      { names: ['clone3'], action: 'SCMP_ACT_ERRNO', errnoRet: ENOSYS },
    ],
  };
}
