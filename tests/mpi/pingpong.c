/* Ping-pong between ranks 0 and 1 (other ranks idle), for bench/mpi and the MPI tests.
 *
 *   pingpong [LAT_ITERS [BW_ITERS [BW_BYTES]]]     defaults 20000 200 4194304
 *
 * Rank 0 prints one JSON line:
 *   {"lat_bytes": 8, "lat_us": half round trip in microseconds,
 *    "bw_bytes": 4194304, "bw_MBps": bytes / half round trip in 10^6 B/s, ...}
 * Both measurements are preceded by a tenth as many warm-up round trips.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double pingpong(int rank, char *buf, int bytes, int iters)
{
    double t0 = 0;
    int i, warm = iters / 10 + 1;
    for (i = -warm; i < iters; i++) {
        if (i == 0) {
            MPI_Barrier(MPI_COMM_WORLD);
            t0 = MPI_Wtime();
        }
        if (rank == 0) {
            MPI_Send(buf, bytes, MPI_BYTE, 1, 7, MPI_COMM_WORLD);
            MPI_Recv(buf, bytes, MPI_BYTE, 1, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            MPI_Recv(buf, bytes, MPI_BYTE, 0, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, bytes, MPI_BYTE, 0, 7, MPI_COMM_WORLD);
        }
    }
    return (MPI_Wtime() - t0) / iters / 2; /* one way */
}

int main(int argc, char **argv)
{
    int rank, size;
    int lat_iters = argc > 1 ? atoi(argv[1]) : 20000;
    int bw_iters = argc > 2 ? atoi(argv[2]) : 200;
    int bw_bytes = argc > 3 ? atoi(argv[3]) : 4 << 20;
    char *buf;
    double lat, bw;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2) {
        if (rank == 0)
            fprintf(stderr, "pingpong: needs at least 2 ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    buf = malloc(bw_bytes > 8 ? bw_bytes : 8);
    memset(buf, 1, bw_bytes > 8 ? bw_bytes : 8);
    lat = pingpong(rank, buf, 8, lat_iters);
    bw = pingpong(rank, buf, bw_bytes, bw_iters);
    if (rank == 0) {
        printf("{\"lat_bytes\": 8, \"lat_us\": %.3f, \"lat_iters\": %d, "
               "\"bw_bytes\": %d, \"bw_MBps\": %.1f, \"bw_iters\": %d, \"size\": %d}\n",
               lat * 1e6, lat_iters, bw_bytes, bw_bytes / bw / 1e6, bw_iters, size);
        fflush(stdout);
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
