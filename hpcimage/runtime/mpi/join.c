/* hpcimage-join: the per-rank fast path of image-mpi.
 *
 * The ranks of one MPI job on one node share one container (user + mount namespace,
 * one image mount) kept by a holder process; see hpcimage/runtime/mpi/ (shared.py, recipe.py). The first
 * rank (Python) starts the holder and writes a *recipe*: what its own plan does after
 * the namespaces exist (working directory, environment, the /bin/sh prologue). Every
 * other rank runs this small program instead of a Python interpreter:
 *
 *   hpcimage-join PYTHON -I -c CODE image-mpi-rank [RUNTIME OPTIONS] -- PROGRAM [ARGS]
 *   hpcimage-join PYTHON -I -c CODE image-mpi [RUNTIME OPTIONS] [--] PROGRAM [ARGS]
 *
 * (the second from the image-mpi wrapper: a rank of `srun image-mpi PROGRAM`; when the
 * wrapper is not a rank, it starts the launcher, and this execs Python at once)
 *
 * It takes the job's lock, finds the live holder and the recipe, checks that the recipe
 * was made for the same options, the same working directory and the same environment
 * (only the variables under the recipe's per-rank prefixes -- PMIX_, OMPI_, SLURM_, ...
 * -- may differ), joins the holder's namespaces with setns(2) and execs PROGRAM with
 * the recipe applied to its own environment. Whenever anything is missing or differs
 * it execs the Python rank (argv[1...]) unchanged, which does the full job; when no
 * holder exists yet it hands the still-held job lock to Python (HPCIMAGE_MPI_LOCKED_FD)
 * so the other ranks wait for the holder instead of racing to make their own.
 *
 * Exit statuses and messages match the Python runtime: 127 command not found, 126 not
 * executable, 2 for a bad --pwd, 1 for other errors. Linux, C99, libc only.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAGIC "HPCIMAGE-RECIPE 1"
#define MAX_ITEMS 65536

extern char **environ;

static char **pyargv;                /* the Python rank: argv + 1 */
static int tracing;                  /* HPCIMAGE_TRACE=1: say which path each rank took */

static void fallback_why(int lockfd, const char *why)
{
    char buf[32];
    if (tracing)
        fprintf(stderr, "hpcimage-join: %d: Python rank: %s\n", (int)getpid(), why);
    if (lockfd >= 0) {
        snprintf(buf, sizeof buf, "%d", lockfd);
        setenv("HPCIMAGE_MPI_LOCKED_FD", buf, 1);
    }
    execv(pyargv[0], pyargv);
    fprintf(stderr, "image-mpi: error: cannot start %s: %s\n", pyargv[0], strerror(errno));
    _exit(1);
}


static void die(int status, const char *fmt, const char *a, const char *b)
{
    fprintf(stderr, "image-mpi: error: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
    _exit(status);
}

/* The command's signal state, as hpcimage.linux.procstate.for_exec() gives it (the
 * Python rank's): SIGPIPE and SIGXFSZ at their default (the interpreter that may have
 * started our launcher ignores them), every other disposition as our caller left it
 * (this program changes none), an empty signal mask. */
static void exec_signal_state(void)
{
    sigset_t none;
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* ---------------------------------------------------------------- the job's key */

static const char *getenv_nonempty(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

/* Same rules as jobenv.is_rank(): started by a launcher as one rank of a job. */
static int is_rank(void)
{
    static const char *markers[] = {"PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMI_FD"};
    for (size_t i = 0; i < sizeof markers / sizeof *markers; i++)
        if (getenv_nonempty(markers[i]))
            return 1;
    const char *step = getenv_nonempty("SLURM_STEP_ID");
    if (!step)
        step = getenv_nonempty("SLURM_STEPID");
    if (!step || strlen(step) > 10 || strspn(step, "0123456789") != strlen(step))
        return 0;
    return strtoull(step, NULL, 10) < 0xFFFFFFF0ull;
}

/* The wrapper form (`srun image-mpi [OPTIONS] [--] PROGRAM`, no `--` needed): the
 * recipe's signature is "image-mpi" and the option words the planning rank's parser
 * took (rank.wrapper_signature). Our words must start with exactly those, and the next
 * one must be PROGRAM: not an option (then the runtime's parser, in the same state
 * after the same words, stops there too). Returns PROGRAM's index, or -1. */
static int wrapper_program(const char *sig, int first, int argc, char **argv)
{
    static const char head[] = "image-mpi\x1f";
    if (strncmp(sig, head, sizeof head - 1))
        return -1;
    sig += sizeof head - 1;
    int i = first + 1;
    while (*sig) {
        if (i >= argc)
            return -1;
        size_t l = strlen(argv[i]);
        if (strncmp(sig, argv[i], l) || sig[l] != '\x1f')
            return -1;
        sig += l + 1;
        i++;
    }
    return i < argc && argv[i][0] != '-' ? i : -1;
}

/* Same rules as jobenv.job_key(): the first complete group, joined with '-',
 * other characters than [A-Za-z0-9._-] replaced by '_', at most 120 characters. */
static int job_key(char *out, size_t size)
{
    static const char *groups[][3] = {
        {"SLURM_JOB_ID", "SLURM_STEP_ID", NULL}, {"PMIX_NAMESPACE", NULL, NULL},
        {"OMPI_MCA_ess_base_jobid", NULL, NULL}, {"OMPI_MCA_orte_ess_jobid", NULL, NULL},
        {"PMI_KVSNAME", NULL, NULL}, {"PMI_ID_SPACE", NULL, NULL}};
    const char *forced = getenv_nonempty("HPCIMAGE_MPI_KEY");
    char key[1024];
    key[0] = 0;
    if (forced) {
        snprintf(key, sizeof key, "%s", forced);
    } else {
        for (size_t g = 0; g < sizeof groups / sizeof groups[0] && !key[0]; g++) {
            int ok = 1;
            for (int i = 0; i < 3 && groups[g][i]; i++)
                ok = ok && getenv_nonempty(groups[g][i]);
            if (!ok)
                continue;
            for (int i = 0; i < 3 && groups[g][i]; i++) {
                if (i)
                    strncat(key, "-", sizeof key - strlen(key) - 1);
                strncat(key, getenv(groups[g][i]), sizeof key - strlen(key) - 1);
            }
        }
    }
    if (!key[0])
        return -1;
    size_t n = 0;
    for (const char *p = key; *p && n < 120 && n + 1 < size; p++, n++) {
        unsigned char c = (unsigned char)*p;
        out[n] = ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
                  || c == '.' || c == '_' || c == '-') ? (char)c : '_';
    }
    out[n] = 0;
    return 0;
}

/* --------------------------------------------------------------------- files */

static char *read_all(int dirfd, const char *name, size_t *len)
{
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf)
            break;
        if (n == cap) {
            char *b = realloc(buf, 2 * cap + 1);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            free(buf);
            buf = NULL;
            break;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    if (buf) {
        buf[n] = 0;
        *len = n;
    }
    return buf;
}

static int alive(long pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' && p[2] && p[2] != 'Z' && p[2] != 'X';
}

/* ------------------------------------------------------------------ the recipe */

struct recipe {
    const char *sig, *cwd, *workdir, *home, *prog, *script;
    int explicit_pwd;
    const char *vary[64], *ignore[64], *translate[64];
    int nvary, nignore, ntranslate;
    /* NAME=VALUE lists; keep, final_keep: names whose recipe value wins */
    const char **host, **out, **sh_out, **keep, **final, **final_keep;
    int nhost, nout, nsh_out, nkeep, nfinal, nfinal_keep;
};

/* The file: MAGIC\0 then KEY\0VALUE\0 pairs. Lists repeat their key. */
static int parse_recipe(char *buf, size_t len, struct recipe *r)
{
    memset(r, 0, sizeof *r);
    struct { const char *key; const char ***list; int *n; int cap; } lists[] = {
        {"vary", NULL, &r->nvary, 64}, {"ignore", NULL, &r->nignore, 64},
        {"translate", NULL, &r->ntranslate, 64}, {"host", &r->host, &r->nhost, MAX_ITEMS},
        {"out", &r->out, &r->nout, MAX_ITEMS}, {"sh_out", &r->sh_out, &r->nsh_out, MAX_ITEMS},
        {"keep", &r->keep, &r->nkeep, MAX_ITEMS}, {"final", &r->final, &r->nfinal, MAX_ITEMS},
        {"final_keep", &r->final_keep, &r->nfinal_keep, MAX_ITEMS}};
    const char **fixed[] = {r->vary, r->ignore, r->translate};
    size_t nlists = sizeof lists / sizeof lists[0];
    for (size_t i = 3; i < nlists; i++)
        if (!(*lists[i].list = calloc(MAX_ITEMS, sizeof(char *))))
            return -1;
    if (len < sizeof MAGIC || memcmp(buf, MAGIC, sizeof MAGIC) != 0 || buf[len - 1] != 0)
        return -1;
    char *p = buf + sizeof MAGIC, *end = buf + len;
    while (p < end) {
        char *k = p;
        p += strlen(p) + 1;
        if (p >= end)
            return -1;
        char *v = p;
        p += strlen(p) + 1;
        if (!strcmp(k, "sig")) r->sig = v;
        else if (!strcmp(k, "cwd")) r->cwd = v;
        else if (!strcmp(k, "workdir")) r->workdir = v;
        else if (!strcmp(k, "home")) r->home = v;
        else if (!strcmp(k, "explicit_pwd")) r->explicit_pwd = !strcmp(v, "1");
        else if (!strcmp(k, "prog")) r->prog = v;
        else if (!strcmp(k, "script")) r->script = v;
        else {
            for (size_t i = 0; i < nlists; i++) {
                if (strcmp(k, lists[i].key))
                    continue;
                if (*lists[i].n >= lists[i].cap || (i == 2 && !strchr(v, '=')))
                    return -1;
                const char **list = i < 3 ? fixed[i] : *lists[i].list;
                list[(*lists[i].n)++] = v;
            }
        }   /* unknown keys: ignored (a newer writer may add some) */
    }
    return r->sig && r->cwd && r->workdir && r->home && r->prog && r->script ? 0 : -1;
}

static int prefixed(const char *const *list, int n, const char *entry)
{
    for (int i = 0; i < n; i++)
        if (!strncmp(entry, list[i], strlen(list[i])))
            return 1;
    return 0;
}

/* Per-rank variables: passed from our own environment. */
static int varies(const struct recipe *r, const char *entry)
{
    return prefixed(r->vary, r->nvary, entry);
}

/* Neither compared nor passed (what --cleanenv drops that mpirun adds). */
static int ignored(const struct recipe *r, const char *entry)
{
    return prefixed(r->ignore, r->nignore, entry);
}

static size_t name_len(const char *entry)
{
    const char *eq = strchr(entry, '=');
    return eq ? (size_t)(eq - entry) : strlen(entry);
}

/* Is NAME=... (entry's name) one of the names of the list? */
static const char *find_name(const char **list, int n, const char *entry, size_t nl)
{
    for (int i = 0; i < n; i++)
        if (!strncmp(list[i], entry, nl) && (list[i][nl] == '=' || list[i][nl] == 0))
            return list[i];
    return NULL;
}

/* Our environment matches the planning rank's outside the per-rank prefixes. */
static int same_environment(const struct recipe *r)
{
    int n = 0;
    for (char **e = environ; *e; e++) {
        if (!strncmp(*e, "HPCIMAGE_MPI_LOCKED_FD=", 23) || varies(r, *e) || ignored(r, *e))
            continue;
        const char *h = find_name(r->host, r->nhost, *e, name_len(*e));
        if (!h || strcmp(h, *e)) {
            if (tracing)
                fprintf(stderr, "hpcimage-join: %d: %.*s differs\n", (int)getpid(),
                        (int)name_len(*e), *e);
            return 0;
        }
        n++;
    }
    if (n != r->nhost && tracing)
        for (int i = 0; i < r->nhost; i++) {
            size_t nl = name_len(r->host[i]);
            int found = 0;
            for (char **e = environ; *e && !found; e++)
                found = !strncmp(*e, r->host[i], nl) && (*e)[nl] == '=';
            if (!found)
                fprintf(stderr, "hpcimage-join: %d: %.*s unset\n", (int)getpid(), (int)nl,
                        r->host[i]);
        }
    return n == r->nhost;
}

/* The command's environment: the recipe's, with our per-rank variables in place of
 * the planning rank's (unless the recipe sets that name itself: keep lists them). */
static char **rank_environment(const struct recipe *r, const char **base, int nbase,
                               const char **keep, int nkeep)
{
    int n = 0;
    for (char **e = environ; *e; e++)
        n++;
    char **env = calloc((size_t)(nbase + n + r->ntranslate + 1), sizeof(char *));
    if (!env)
        return NULL;
    int k = 0;
    for (int i = 0; i < nbase; i++) {
        size_t nl = name_len(base[i]);
        if (varies(r, base[i]) && !find_name(keep, nkeep, base[i], nl))
            continue;                            /* the planning rank's own value */
        env[k++] = (char *)base[i];
    }
    for (char **e = environ; *e; e++) {
        size_t nl = name_len(*e);
        if (!varies(r, *e) || ignored(r, *e) || find_name(keep, nkeep, *e, nl))
            continue;
        env[k++] = *e;
    }
    env[k] = NULL;
    /* PMIX_{PTL_MODULE,...} -> PMIX_MCA_{ptl,...} when unset (rank.rank_environ) */
    for (int i = 0; i < r->ntranslate; i++) {
        const char *eq = strchr(r->translate[i], '=');
        size_t sl = (size_t)(eq - r->translate[i]);
        char src[256];
        if (sl >= sizeof src)
            continue;
        memcpy(src, r->translate[i], sl);
        src[sl] = 0;
        const char *val = getenv(src), *dst = eq + 1;
        size_t dl = strlen(dst);
        int present = 0;
        for (int j = 0; j < k && !present; j++)
            present = !strncmp(env[j], dst, dl) && env[j][dl] == '=';
        if (!val || !*val || present)
            continue;
        char *entry = malloc(dl + strlen(val) + 2);
        if (!entry)
            return NULL;
        sprintf(entry, "%s=%s", dst, val);
        env[k++] = entry;
        env[k] = NULL;
    }
    return env;
}

static const char *env_get(char **env, const char *name)
{
    size_t nl = strlen(name);
    for (char **e = env; *e; e++)
        if (!strncmp(*e, name, nl) && (*e)[nl] == '=')
            return *e + nl + 1;
    return NULL;
}

static int has_env_scripts(void)
{
    if (access("/bin/sh", X_OK) != 0)
        return 0;
    DIR *d = opendir("/.singularity.d/env");
    if (!d)
        return 0;
    struct dirent *de;
    int found = 0;
    while (!found && (de = readdir(d))) {
        size_t l = strlen(de->d_name);
        found = l > 3 && !strcmp(de->d_name + l - 3, ".sh");
    }
    closedir(d);
    return found;
}

/* -------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: hpcimage-join PYTHON ... image-mpi-rank [OPTIONS] -- PROGRAM [ARGS]\n");
        return 2;
    }
    pyargv = argv + 1;
    const char *trace = getenv("HPCIMAGE_TRACE");
    tracing = trace && !strcmp(trace, "1");
    int first = -1, sep = -1, wrapper = 0;
    for (int i = 1; i < argc; i++) {
        if (first < 0 && (!strcmp(argv[i], "image-mpi-rank") || !strcmp(argv[i], "image-mpi"))) {
            first = i;
            wrapper = !strcmp(argv[i], "image-mpi");
            if (wrapper)
                break;
        } else if (first >= 0 && !strcmp(argv[i], "--")) {
            sep = i;
            break;
        }
    }
    const char *join = getenv("HPCIMAGE_MPI_JOIN");
    if (wrapper && (!is_rank() || (join && !strcmp(join, "0")))) {
        /* the image-mpi wrapper starting a launcher, or the joiner is off */
        execv(pyargv[0], pyargv);
        fprintf(stderr, "image-mpi: error: cannot start %s: %s\n", pyargv[0], strerror(errno));
        return 1;
    }
    const char *share = getenv("HPCIMAGE_MPI_SHARE");
    if (share && !strcmp(share, "0"))
        fallback_why(-1, "HPCIMAGE_MPI_SHARE=0");
    if (!wrapper && (first < 0 || sep < 0 || sep + 1 >= argc))
        fallback_why(-1, "no image-mpi-rank ... -- PROGRAM on the command line");
    char key[128];
    if (job_key(key, sizeof key) != 0)
        fallback_why(-1, "no job key in the environment");

    /* The per-user state directory, as shared._state_base() checks it. */
    char base[4096];
    const char *state_root = getenv_nonempty("HPCIMAGE_MPI_STATE");
    snprintf(base, sizeof base, "%s/hpcimage-%u", state_root ? state_root : "/tmp",
             (unsigned)getuid());
    struct stat st;
    if (lstat(base, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid())
        fallback_why(-1, "state directory missing or not ours");
    int basefd = open(base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);   /* inherited */
    if (basefd < 0)
        fallback_why(-1, "cannot open the state directory");

    for (int attempt = 0; attempt < 50; attempt++) {
        if (flock(basefd, LOCK_EX) != 0)
            fallback_why(-1, "cannot lock the state directory");
        int statefd = openat(basefd, key, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (statefd < 0)
            fallback_why(basefd, "no holder yet (this rank starts it)");                  /* no holder yet: Python makes it */
        int refs = openat(statefd, "refs", O_RDONLY);   /* kept across exec */
        if (refs < 0)
            fallback_why(basefd, "no holder yet (this rank starts it)");
        if (flock(refs, LOCK_SH | LOCK_NB) != 0) {      /* the holder is tearing down */
            close(refs);
            close(statefd);
            flock(basefd, LOCK_UN);
            usleep(50000);
            continue;
        }
        size_t len;
        char *pidtext = read_all(statefd, "holder", &len);
        long pid = pidtext ? strtol(pidtext, NULL, 10) : 0;
        if (pid <= 0 || !alive(pid)) {
            close(refs);
            fallback_why(basefd, "holder gone (this rank starts a new one)");
        }
        char *raw = read_all(statefd, "recipe", &len);
        struct recipe r;
        close(statefd);
        char path[64];
        snprintf(path, sizeof path, "/proc/%ld/ns/user", pid);
        int userfd = open(path, O_RDONLY | O_CLOEXEC);
        snprintf(path, sizeof path, "/proc/%ld/ns/mnt", pid);
        int mntfd = open(path, O_RDONLY | O_CLOEXEC);
        flock(basefd, LOCK_UN);
        close(basefd);
        if (!raw || parse_recipe(raw, len, &r) != 0 || userfd < 0 || mntfd < 0) {
            close(refs);
            fallback_why(-1, "no usable recipe");                       /* Python joins the holder itself */
        }

        /* Made for this command line, this directory, this environment? */
        int prog = sep + 1;
        if (wrapper && (prog = wrapper_program(r.sig, first, argc, argv)) < 0) {
            close(refs);
            fallback_why(-1, "recipe made for other options");
        }
        size_t siglen = 0;
        for (int i = first + 1; i < sep; i++)
            siglen += strlen(argv[i]) + 1;
        char *sig = malloc(siglen + 1), *q = sig;
        if (!sig)
            fallback_why(-1, "out of memory");
        for (int i = first + 1; i < sep; i++) {
            size_t l = strlen(argv[i]);
            memcpy(q, argv[i], l);
            q[l] = '\x1f';
            q += l + 1;
        }
        *q = 0;
        char cwd[4096];
        const char *differs = !wrapper && strcmp(sig, r.sig) ? "recipe made for other options"
            : !getcwd(cwd, sizeof cwd) || strcmp(cwd, r.cwd) ? "recipe made in another directory"
            : !same_environment(&r) ? "recipe made for another environment" : NULL;
        if (differs) {
            close(refs);
            fallback_why(-1, differs);
        }

        if (getuid() != 0 && setns(userfd, CLONE_NEWUSER) != 0)
            die(1, "joining the node's shared container: setns(user): %s%s", strerror(errno), "");
        if (setns(mntfd, CLONE_NEWNS) != 0)
            die(1, "joining the node's shared container: setns(mnt): %s%s", strerror(errno), "");
        close(userfd);
        close(mntfd);
        if (chdir(r.workdir) != 0) {
            if (r.explicit_pwd)
                die(2, "--pwd %s: no such directory in the container%s", r.workdir, "");
            if (chdir(r.home) != 0 && chdir("/") != 0)
                die(1, "chdir /: %s%s", strerror(errno), "");
        }

        if (tracing)
            fprintf(stderr, "hpcimage-join: %d: joined holder %ld (%s)\n", (int)getpid(), pid,
                    r.nfinal ? "the probed environment" : "the planned environment");
        char **cmd = argv + prog;
        int ncmd = argc - prog;
        if (r.nfinal == 0 && has_env_scripts()) {
            char **env = rank_environment(&r, r.sh_out, r.nsh_out, r.keep, r.nkeep);
            char **av = calloc((size_t)ncmd + 5, sizeof(char *));
            if (!env || !av)
                die(1, "out of memory%s%s", "", "");
            av[0] = "/bin/sh";
            av[1] = "-c";
            av[2] = (char *)r.script;
            av[3] = "hpcimage";
            memcpy(av + 4, cmd, (size_t)ncmd * sizeof(char *));
            exec_signal_state();
            execve("/bin/sh", av, env);
            die(126, "/bin/sh: cannot execute: %s%s", strerror(errno), "");
        }
        /* The env scripts' result, found once by the holder (shared._probe_env), or, for
         * an image without env scripts, the planned environment. */
        char **env = r.nfinal ? rank_environment(&r, r.final, r.nfinal, r.final_keep, r.nfinal_keep)
                              : rank_environment(&r, r.out, r.nout, r.keep, r.nkeep);
        if (!env)
            die(1, "out of memory%s%s", "", "");
        const char *c = cmd[0];
        exec_signal_state();
        if (strchr(c, '/')) {
            execve(c, cmd, env);
        } else {
            const char *pathvar = env_get(env, "PATH");
            char *paths = strdup(pathvar ? pathvar : "");
            for (char *dir = paths, *next; dir; dir = next) {
                next = strchr(dir, ':');
                if (next)
                    *next++ = 0;
                char full[4096];
                snprintf(full, sizeof full, "%s/%s", *dir ? dir : ".", c);
                if (stat(full, &st) == 0 && S_ISREG(st.st_mode) && access(full, X_OK) == 0) {
                    execve(full, cmd, env);
                    break;
                }
            }
            if (errno == 0 || errno == ENOENT)
                die(127, "%s: command not found in the image (PATH=%s)", c,
                    pathvar ? pathvar : "");
        }
        if (errno == ENOENT)
            die(127, "%s: no such file in the image%s", c, "");
        if (errno == EACCES || errno == EISDIR)
            die(126, "%s: %s", c, stat(c, &st) == 0 && S_ISDIR(st.st_mode)
                ? "is a directory, not a program" : "not executable (permission denied)");
        die(126, "%s: cannot execute: %s", c, strerror(errno));
    }
    fallback_why(-1, "the holder kept tearing down");
    return 1;
}
