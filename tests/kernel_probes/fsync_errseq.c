/* fsync and writeback errors on a block device, several opens: what Linux 6.1 does.
 *
 * Recorded with the oracle (2026-12-02, 6.1.0-57-cloud-amd64):
 *   gcc -static -O1 -o probe fsync_errseq.c
 *   kernel-dm run --disk a.img --file probe --script scenario.sh
 * scenario.sh:
 *   dmsetup create good --table "0 2048 linear /dev/vda 0"
 *   dmsetup create bad --table "0 2048 error"
 *   cp /kdm/files/probe /tmp/probe && chmod +x /tmp/probe
 *   /tmp/probe /dev/mapper/good /dev/mapper/bad /dev/vda
 * output (errno 5 is EIO):
 *   A disk before fsync: A        (the guest had written it back already: no guarantee)
 *   A fsync(direct) = 0
 *   A disk after direct fsync: A
 *   A2 direct read: R
 *   A2 disk after direct read: R
 *   B fsync direct,buffered,direct,buffered = 5 5 0 0
 *   C close = 0
 *   C reopen fsync,fsync = 5 0
 *   D direct reopen fsync,fsync = 5 0
 *   E fsync, later open's fsync = 5 0
 * Run against dmsim's FUSE files (good, bad, the image under good) it prints the same
 * but for the first line (0: still only in the buffer cache).  tests/test_fuse.py checks
 * these cases in Python (test_*_fsync_* below test_writeback_error_reaches_every_open_once).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static char *buf;
static int sync_rc(int fd) { return fsync(fd) ? errno : 0; }
static char disk_byte(const char *p) {
    int fd = open(p, O_RDONLY | O_DIRECT); if (fd < 0) return '?';
    if (pread(fd, buf, 4096, 0) != 4096) { close(fd); return '!'; }
    close(fd); return buf[0] ? buf[0] : '0';
}
int main(int argc, char **argv) {
    const char *good = argv[1], *bad = argv[2], *disk = argv[3];
    posix_memalign((void **)&buf, 4096, 4096);
    /* A: an O_DIRECT fsync writes back another open's dirty buffers */
    int a = open(good, O_RDWR), b = open(good, O_RDWR | O_DIRECT);
    memset(buf, 'A', 4096); pwrite(a, buf, 4096, 0);
    printf("A disk before fsync: %c\n", disk_byte(disk));
    printf("A fsync(direct) = %d\n", sync_rc(b));
    printf("A disk after direct fsync: %c\n", disk_byte(disk));
    close(a); close(b);
    /* A2: an O_DIRECT read of a range another open has dirty writes it back first */
    a = open(good, O_RDWR);
    memset(buf, 'R', 4096); pwrite(a, buf, 4096, 8192);
    b = open(good, O_RDONLY | O_DIRECT);
    pread(b, buf, 4096, 8192);
    printf("A2 direct read: %c\n", buf[0]);
    int fd = open(disk, O_RDONLY | O_DIRECT); pread(fd, buf, 4096, 8192); close(fd);
    printf("A2 disk after direct read: %c\n", buf[0] ? buf[0] : '0');
    close(a); close(b);
    /* B: a failed writeback is reported to the O_DIRECT open's fsync too */
    a = open(bad, O_RDWR); b = open(bad, O_RDWR | O_DIRECT);
    memset(buf, 'B', 4096); pwrite(a, buf, 4096, 0);
    int r1 = sync_rc(b), r2 = sync_rc(a), r3 = sync_rc(b), r4 = sync_rc(a);
    printf("B fsync direct,buffered,direct,buffered = %d %d %d %d\n", r1, r2, r3, r4);
    close(a); close(b);
    /* C: an error of the last close's writeback is told to the next opener */
    a = open(bad, O_RDWR);
    memset(buf, 'C', 4096); pwrite(a, buf, 4096, 0);
    printf("C close = %d\n", close(a) ? errno : 0);
    a = open(bad, O_RDWR);
    r1 = sync_rc(a); r2 = sync_rc(a);
    printf("C reopen fsync,fsync = %d %d\n", r1, r2);
    close(a);
    /* D: the same, the next opener O_DIRECT */
    a = open(bad, O_RDWR);
    memset(buf, 'D', 4096); pwrite(a, buf, 4096, 0);
    close(a);
    b = open(bad, O_RDWR | O_DIRECT);
    r1 = sync_rc(b); r2 = sync_rc(b);
    printf("D direct reopen fsync,fsync = %d %d\n", r1, r2);
    /* E: an error seen by an fsync is not told to a later opener */
    a = open(bad, O_RDWR);
    memset(buf, 'E', 4096); pwrite(a, buf, 4096, 0);
    r1 = sync_rc(a);
    int c = open(bad, O_RDWR);
    r2 = sync_rc(c);
    printf("E fsync, later open's fsync = %d %d\n", r1, r2);
    close(a); close(b); close(c);
    return 0;
}
