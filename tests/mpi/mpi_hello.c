/* MPI hello for the MPI tests: one line per rank,
 *
 *   rank=R size=N sum=S host=H lib=/path/of/the/libmpi/mapped version=...
 *
 * sum is an MPI_Allreduce of rank+1 over MPI_COMM_WORLD (N*(N+1)/2 when the ranks are
 * wired together; a set of singletons prints size=1 sum=1). lib is the first file in
 * /proc/self/maps whose name starts with libmpi (Open MPI's libmpi.so.40, MPICH's
 * libmpich.so.12), i.e. the MPI library really loaded: host or image, bound or not.
 * Tabs in the version become spaces. Exit status 0, or 3 when the sum is wrong.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void mapped_libmpi(char *out, size_t n)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    snprintf(out, n, "?");
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        char *path = strchr(line, '/');
        char *base;
        if (!path)
            continue;
        path[strcspn(path, "\n")] = 0;
        base = strrchr(path, '/') + 1;
        if (strncmp(base, "libmpi.so", 9) == 0 || strncmp(base, "libmpich.so", 11) == 0) {
            snprintf(out, n, "%s", path);
            break;
        }
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    int rank, size, one, sum, len;
    char host[256], lib[4096], version[MPI_MAX_LIBRARY_VERSION_STRING];

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    one = rank + 1;
    MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    gethostname(host, sizeof host);
    host[sizeof host - 1] = 0;
    mapped_libmpi(lib, sizeof lib);
    MPI_Get_library_version(version, &len);
    version[strcspn(version, "\n,")] = 0;
    for (char *c = version; *c; c++)
        if (*c == '\t')
            *c = ' ';
    printf("rank=%d size=%d sum=%d host=%s lib=%s version=%s\n", rank, size, sum, host, lib,
           version);
    fflush(stdout);
    MPI_Finalize();
    return sum == size * (size + 1) / 2 ? 0 : 3;
}
