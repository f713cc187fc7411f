/* The launcher inside a warm sandbox, in C: what warm_launcher.py does, without the ~10 ms of
 * CPU a Python interpreter takes to start, paid by every new job's sandbox. The agent compiles
 * it with the host's C compiler (native_launcher.py) and runs warm_launcher.py where it cannot.
 * Both speak the same protocol; warm_launcher.py's docstring describes it, in short:
 *
 *   argv: launcher CONTROL RLIMITS HOME...  (CONTROL: a SOCK_SEQPACKET socket to the agent;
 *         RLIMITS "RLIMIT_CORE=0,RLIMIT_FSIZE=..."; each HOME the launcher's own cgroup.procs)
 *   in:   "id\0cwd\0argc\0argv...\0NAME=value\0..." with descriptors: the task's output pipe,
 *         then the task's cgroup.procs in each hierarchy
 *   out:  "ready <pid>", then per task "<id> started <pid>" | "<id> failed <reason>" |
 *         "<id> error <reason>", and later "<id> status <wait status>"
 *
 * PID 1 of the sandbox: no task can signal it (it sets no handler) or trace it (it is not
 * dumpable); it reaps orphans; it exits when the agent closes the socket, and the namespace
 * with it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_FDS 16            /* the output pipe and a cgroup.procs per hierarchy */
#define MAX_MESSAGE (1 << 20) /* the agent sends at most 128 KiB */
#define MAX_FIELDS 65536     /* arguments and environment entries of one task */
#define MAX_REPLY 1024
#define DEFAULT_PATH "/bin:/usr/bin" /* Python's os.defpath, as warm_launcher.py uses */

static int control = -1;
static int home[MAX_FDS];
static int home_count = 0;

struct child {
    pid_t pid;
    char id[32];
};
static struct child *children = NULL;
static size_t child_count = 0, child_room = 0;

static char message[MAX_MESSAGE];

static void die(const char *what) {
    /* bwrap hands this to the agent's log: the sandbox is of no use, and ends. */
    fprintf(stderr, "planetary-mesh launcher: %s: %s\n", what, strerror(errno));
    _exit(2);
}

static void reply(const char *format, ...) {
    char text[MAX_REPLY];
    va_list args;
    va_start(args, format);
    int length = vsnprintf(text, sizeof text, format, args);
    va_end(args);
    if (length < 0)
        return;
    if ((size_t)length >= sizeof text)
        length = sizeof text - 1;
    if (send(control, text, (size_t)length, MSG_NOSIGNAL) < 0)
        _exit(0); /* the agent is gone: so is this sandbox */
}

/* Move this process into the cgroups whose cgroup.procs are open on fds ("0": the writer). */
static int join(const int *fds, int count) {
    for (int i = 0; i < count; i++)
        if (write(fds[i], "0", 1) != 1)
            return -1;
    return 0;
}

static int set_rlimits(char *spec) {
    static const struct {
        const char *name;
        int resource;
    } names[] = {
        {"RLIMIT_CORE", RLIMIT_CORE},   {"RLIMIT_FSIZE", RLIMIT_FSIZE},
        {"RLIMIT_NOFILE", RLIMIT_NOFILE}, {"RLIMIT_NPROC", RLIMIT_NPROC},
        {"RLIMIT_AS", RLIMIT_AS},       {"RLIMIT_CPU", RLIMIT_CPU},
        {"RLIMIT_DATA", RLIMIT_DATA},   {"RLIMIT_STACK", RLIMIT_STACK},
    };
    for (char *item = strtok(spec, ","); item != NULL; item = strtok(NULL, ",")) {
        char *equals = strchr(item, '=');
        if (equals == NULL)
            return -1;
        *equals = '\0';
        int found = -1;
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            if (strcmp(names[i].name, item) == 0)
                found = names[i].resource;
        char *end;
        errno = 0;
        unsigned long long value = strtoull(equals + 1, &end, 10);
        if (found < 0 || *end != '\0' || errno != 0) {
            errno = EINVAL;
            return -1;
        }
        struct rlimit limit = {(rlim_t)value, (rlim_t)value};
        if (setrlimit(found, &limit) < 0)
            return -1;
    }
    return 0;
}

/* argv[0] as execvpe would find it: on the task's own PATH unless it names a path. Returns an
 * errno value (0: found, in path). */
static int command_path(const char *name, char *const *env, char *path, size_t room) {
    if (strchr(name, '/') != NULL) {
        if (strlen(name) >= room)
            return ENAMETOOLONG;
        strcpy(path, name);
        return 0;
    }
    const char *search = DEFAULT_PATH;
    for (char *const *entry = env; *entry != NULL; entry++)
        if (strncmp(*entry, "PATH=", 5) == 0)
            search = *entry + 5;
    while (1) {
        const char *colon = strchrnul(search, ':');
        size_t length = (size_t)(colon - search);
        const char *folder = length ? search : ".";
        int written = snprintf(path, room, "%.*s/%s", length ? (int)length : 1, folder, name);
        struct stat info;
        if (written > 0 && (size_t)written < room && stat(path, &info) == 0 &&
            S_ISREG(info.st_mode) && access(path, X_OK) == 0)
            return 0;
        if (*colon == '\0')
            return ENOENT;
        search = colon + 1;
    }
}

static void remember(pid_t pid, const char *id) {
    if (child_count == child_room) {
        size_t room = child_room ? 2 * child_room : 64;
        struct child *grown = realloc(children, room * sizeof *grown);
        if (grown == NULL)
            die("out of memory");
        children = grown;
        child_room = room;
    }
    children[child_count].pid = pid;
    snprintf(children[child_count].id, sizeof children[child_count].id, "%s", id);
    child_count++;
}

/* Signals the launcher found ignored when it started (SIG_IGN survives exec): a task gets every
 * signal at its default, as a fresh process has them. The launcher sets no handler itself. */
static int ignored[_NSIG];
static int ignored_count = 0;

/* What the vfork child of start_task could not do, for its parent (they share memory until
 * the child execs or exits). */
static volatile int join_error, exec_error;

/* Start argv as a task: a vfork child joins the task's cgroups (their cgroup.procs open on
 * cgroups), so all the task ever runs is counted there, then takes a new session, stdin
 * /dev/null, stdout and stderr on out, every signal at its default and none blocked, and execs.
 * The launcher itself never leaves its own cgroup: moving it into the task's and back around a
 * posix_spawn was six moves (in a loop here 1.3 ms a start against 0.26 ms for these three; in
 * the agent, which keeps moves quick, ~0.1 ms), and glibc's posix_spawn left its two internal
 * signals (32, 33) ignored in the task. An errno value (0: started, as *pid); *joined is 0 when
 * the cgroups were the trouble. */
static int start_task(const char *cwd, char **argv, char **env, int out, const int *cgroups,
                      int cgroup_count, pid_t *pid, int *joined) {
    char path[4096];
    *joined = 1;
    int error = chdir(cwd) < 0 ? errno : command_path(argv[0], env, path, sizeof path);
    if (error != 0)
        return error;
    sigset_t all, before;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &before); /* nothing runs a handler on the shared stack */
    join_error = exec_error = 0;
    pid_t child = vfork();
    if (child == 0) {
        for (int i = 0; i < cgroup_count; i++)
            if (write(cgroups[i], "0", 1) != 1) {
                join_error = errno;
                _exit(127);
            }
        setsid();
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || dup2(null, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0) {
            exec_error = errno;
            _exit(127);
        }
        if (null > 2)
            close(null);
        struct sigaction standard;
        memset(&standard, 0, sizeof standard);
        standard.sa_handler = SIG_DFL;
        for (int i = 0; i < ignored_count; i++)
            sigaction(ignored[i], &standard, NULL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(path, argv, env);
        exec_error = errno;
        _exit(127);
    }
    error = child < 0 ? errno : 0;
    sigprocmask(SIG_SETMASK, &before, NULL);
    if (error != 0)
        return error;
    if (join_error != 0 || exec_error != 0) {
        waitpid(child, NULL, 0);
        *joined = join_error == 0;
        return join_error != 0 ? join_error : exec_error;
    }
    *pid = child;
    return 0;
}

/* Spawn the request (fields: id, cwd, argc, argv..., env...) into the task's cgroups. */
static void spawn(char **fields, size_t field_count, const int *fds, int fd_count) {
    const char *id = fields[0], *cwd = fields[1];
    char *end;
    unsigned long argc = strtoul(fields[2], &end, 10);
    if (*end != '\0' || argc == 0 || 3 + argc > field_count) {
        reply("%s error a malformed request", id);
        return;
    }
    if (fd_count != 1 + home_count) {
        reply("%s error %d descriptors sent, %d expected", id, fd_count, 1 + home_count);
        return;
    }
    /* NULL-terminated lists for execve: argv's end is env's start, so copied apart. */
    size_t env_count = field_count - 3 - argc;
    char **argv = calloc(argc + 1, sizeof *argv);
    char **env = calloc(env_count + 1, sizeof *env);
    if (argv == NULL || env == NULL)
        die("out of memory");
    memcpy(argv, fields + 3, argc * sizeof *argv);
    memcpy(env, fields + 3 + argc, env_count * sizeof *env);
    pid_t pid = -1;
    int joined;
    int error = start_task(cwd, argv, env, fds[0], fds + 1, fd_count - 1, &pid, &joined);
    if (chdir("/") < 0)
        die("chdir /");
    if (!joined)
        reply("%s error cannot join the task's cgroup: %s", id, strerror(error));
    else if (error != 0)
        reply("%s failed %s: %s", id, argv[0], strerror(error));
    else {
        remember(pid, id);
        reply("%s started %d", id, (int)pid);
    }
    free(argv);
    free(env);
}

static void receive(void) {
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(MAX_FDS * sizeof(int))];
    } ancillary;
    struct iovec io = {message, sizeof message};
    struct msghdr header = {0};
    header.msg_iov = &io;
    header.msg_iovlen = 1;
    header.msg_control = ancillary.space;
    header.msg_controllen = sizeof ancillary.space;
    /* Received descriptors are close-on-exec at once: none may reach a task. */
    ssize_t length = recvmsg(control, &header, MSG_CMSG_CLOEXEC);
    if (length < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return;
        _exit(0);
    }
    if (length == 0)
        _exit(0); /* the agent is done with this sandbox */
    int fds[MAX_FDS];
    int fd_count = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&header); c != NULL; c = CMSG_NXTHDR(&header, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count && fd_count < MAX_FDS; i++)
            memcpy(&fds[fd_count++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    /* Fields are NUL-terminated; the message ends with one. */
    static char *fields[MAX_FIELDS];
    size_t field_count = 0;
    int whole = (header.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) == 0 && message[length - 1] == '\0';
    for (char *at = message; whole && at < message + length && field_count < MAX_FIELDS;
         at += strlen(at) + 1)
        fields[field_count++] = at;
    if (!whole || field_count < 4)
        reply("%s error a malformed request", whole && field_count ? fields[0] : "0");
    else
        spawn(fields, field_count, fds, fd_count);
    for (int i = 0; i < fd_count; i++)
        close(fds[i]);
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (size_t i = 0; i < child_count; i++) {
            if (children[i].pid == pid) {
                reply("%s status %d", children[i].id, status);
                children[i] = children[--child_count];
                break;
            }
        } /* else an orphan handed to PID 1: reaped, nothing to say */
    }
}

/* Become UID:GID for good, as `setpriv --reuid=UID --regid=GID --clear-groups --inh-caps=-all
 * --bounding-set=-all --no-new-privs` does (the helper ran it before bwrap; its exec, with the
 * libraries it loads, was ~1.7 ms of CPU per sandbox). The bounding set is dropped while still
 * root (it takes CAP_SETPCAP); leaving uid 0 clears the permitted, effective and ambient sets;
 * the inheritable set is cleared last. */
static int become(const char *spec) {
    char *end;
    errno = EINVAL;
    unsigned long uid = strtoul(spec, &end, 10);
    if (end == spec || *end != ':' || uid == 0)
        return -1;
    const char *group = end + 1;
    unsigned long gid = strtoul(group, &end, 10);
    if (end == group || *end != '\0')
        return -1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -1;
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++) /* EINVAL: past the last */
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            return -1;
    if (setgroups(0, NULL) < 0 || setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) < 0 ||
        setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0)
        return -1;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct none[_LINUX_CAPABILITY_U32S_3];
    memset(none, 0, sizeof none);
    if (syscall(SYS_capset, &header, none) < 0)
        return -1;
    uid_t real, effective, saved;
    if (getresuid(&real, &effective, &saved) < 0)
        return -1;
    if (real != uid || effective != uid || saved != uid || getgroups(0, NULL) != 0) {
        errno = EPERM;
        return -1;
    }
    return 0;
}

/* launcher --join FD... [--rlimits SPEC] [--user UID:GID] -- COMMAND...: the agent's helper on
 * the host, not the launcher. It moves itself into the cgroups whose cgroup.procs are open on
 * the FDs, takes the rlimits, becomes the task user, sets every signal to its default, then
 * execs COMMAND (bwrap): everything bwrap forks is born in the sandbox's cgroup, where a kill, or the sweep after a crashed agent,
 * reaches it. Moved in by the agent after the spawn, bwrap could fork first, and a first child
 * left outside was seen waiting for ever once bwrap died; done in the agent's own fork, between
 * fork and exec, it cost a fork of the whole agent (10-30 ms of its event loop) where this is a
 * vfork and one exec more. */
static int join_then_exec(int argc, char **argv) {
    const char *user = NULL;
    int i = 2;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (strcmp(argv[i], "--rlimits") == 0 && i + 1 < argc) {
            if (set_rlimits(argv[++i]) < 0) {
                fprintf(stderr, "planetary-mesh launcher: cannot set the rlimits: %s\n",
                        strerror(errno));
                return 126;
            }
            continue;
        }
        if (strcmp(argv[i], "--user") == 0 && i + 1 < argc) {
            user = argv[++i]; /* last: joining the cgroups takes root */
            continue;
        }
        int fd = atoi(argv[i]);
        if (write(fd, "0", 1) != 1) {
            fprintf(stderr, "planetary-mesh launcher: cannot join the cgroup on fd %d: %s\n", fd,
                    strerror(errno));
            return 126;
        }
    }
    if (i + 1 >= argc) {
        fprintf(stderr, "usage: launcher --join FD... [--rlimits SPEC] [--user UID:GID] --"
                        " COMMAND...\n");
        return 2;
    }
    if (user != NULL && become(user) < 0) {
        fprintf(stderr, "planetary-mesh launcher: cannot become the task user %s: %s\n", user,
                strerror(errno));
        return 126;
    }
    /* bwrap passes on the dispositions it gets, and an agent under nohup has SIGHUP ignored
     * (ignored survives exec): the sandbox starts with every signal at its default and none
     * blocked, as a fresh process has them. */
    struct sigaction standard;
    memset(&standard, 0, sizeof standard);
    standard.sa_handler = SIG_DFL;
    for (int number = 1; number < _NSIG; number++)
        if (number != SIGKILL && number != SIGSTOP)
            sigaction(number, &standard, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execvp(argv[i + 1], argv + i + 1);
    fprintf(stderr, "planetary-mesh launcher: cannot run %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--join") == 0)
        return join_then_exec(argc, argv);
    if (argc < 3 || argc - 3 > MAX_FDS - 1) {
        fprintf(stderr, "usage: launcher CONTROL RLIMITS HOME...\n");
        return 2;
    }
    control = atoi(argv[1]);
    home_count = argc - 3;
    for (int i = 0; i < home_count; i++)
        home[i] = atoi(argv[3 + i]);
    /* Passed down as inheritable; no task may get them. */
    if (fcntl(control, F_SETFD, FD_CLOEXEC) < 0)
        die("control socket");
    for (int i = 0; i < home_count; i++)
        if (fcntl(home[i], F_SETFD, FD_CLOEXEC) < 0)
            die("home cgroup");
    if (join(home, home_count) < 0)
        die("cannot join its cgroup");
    if (set_rlimits(argv[2]) < 0)
        die("cannot set the rlimits");
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        die("prctl(PR_SET_DUMPABLE)");
    for (int number = 1; number < _NSIG; number++) {
        struct sigaction now;
        if (sigaction(number, NULL, &now) == 0 && now.sa_handler == SIG_IGN)
            ignored[ignored_count++] = number;
    }
    /* SIGCHLD is read from a signalfd; tasks get an empty mask (POSIX_SPAWN_SETSIGMASK). */
    sigset_t child_signal;
    sigemptyset(&child_signal);
    sigaddset(&child_signal, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &child_signal, NULL) < 0)
        die("sigprocmask");
    int signals = signalfd(-1, &child_signal, SFD_CLOEXEC | SFD_NONBLOCK);
    if (signals < 0)
        die("signalfd");
    reply("ready %d", (int)getpid());
    struct pollfd watched[2] = {{control, POLLIN, 0}, {signals, POLLIN, 0}};
    while (1) {
        if (poll(watched, 2, 1000) < 0 && errno != EINTR)
            die("poll");
        if (watched[1].revents) {
            struct signalfd_siginfo info;
            while (read(signals, &info, sizeof info) == sizeof info) {
            }
        }
        if (watched[0].revents & (POLLIN | POLLHUP | POLLERR))
            receive();
        reap(); /* also every second: signals of children that end together may merge */
    }
}
