# flakey on 6.1: table strings, constructor errors in the kernel's order, and the
# down-interval behaviour of every feature.  Intervals are 0/3600 style so that the
# state (always up / always down) does not depend on timing.  Kernel side: busybox dd
# ignores iflag=direct and a table keeps DISK1 open (so its page cache stays), hence the
# `flush "$DISK1"` before reading DISK1 back.
t() {
    if dmsetup create f --table "$1"; then dmsetup table f; dmsetup remove f; else echo "create failed"; fi
}
echo "== tables"
dmsetup create f --table "0 8192 flakey $DISK1 0 5 0"
dmsetup table f
dmsetup status f
dmsetup deps f
dmsetup message f 0 hello
dmsetup remove f
t "0 4096 flakey $DISK1 8 1 2 1 drop_writes"
t "0 4096 flakey $DISK1 8 1 2 1 DROP_WRITES"
t "0 4096 flakey $DISK1 0 1 2 1 Error_Writes"
t "0 4096 flakey $DISK1 0 1 2 6 drop_writes corrupt_bio_byte 32 r 1 0"
t "0 4096 flakey $DISK1 0 1 2 5 corrupt_bio_byte 1 W 255 4294967295"
t "0 4096 flakey $DISK1 0 1 2 6 error_writes corrupt_bio_byte 512 r 0 2048"
t "0 4096 flakey $DISK1 0 1 2 0"
t "0 4096 flakey $DISK1 0 1 2 1 drop_writes extra words"
t "0 4096 flakey $DISK1 0 4294967295 0"
t "0 4096 flakey $DISK1 0 4294967296 1"
t "0 4096 flakey $DISK1 18446744073709551616 1 1"
klog
echo "== constructor errors"
t "0 4096 flakey $DISK1 0 0 0"
t "0 4096 flakey $DISK1 0 4294967295 1"
t "0 4096 flakey $DISK1 0 4294967295 2"
t "0 4096 flakey $DISK1 0 1"
t "0 4096 flakey $DISK1 x 1 1"
t "0 4096 flakey $DISK1 -1 1 1"
t "0 4096 flakey $DISK1 0x10 1 1"
t "0 4096 flakey $DISK1 0 1 x"
t "0 4096 flakey $DISK1 0 -1 1"
t "0 4096 flakey $DISK1 0 1 y"
t "0 4096 flakey $DISK1 0 +1 1"
klog
echo "== feature errors"
t "0 4096 flakey $DISK1 0 1 1 2 drop_writes error_writes"
t "0 4096 flakey $DISK1 0 1 1 2 error_writes drop_writes"
t "0 4096 flakey $DISK1 0 1 1 2 drop_writes drop_writes"
t "0 4096 flakey $DISK1 0 1 1 2 error_writes ERROR_WRITES"
t "0 4096 flakey $DISK1 0 1 1 1 bogus"
t "0 4096 flakey $DISK1 0 1 1 1 error_reads"
t "0 4096 flakey $DISK1 0 1 1 x drop_writes"
t "0 4096 flakey $DISK1 0 1 1 2 drop_writes"
t "0 4096 flakey $DISK1 0 1 1 7 drop_writes corrupt_bio_byte 1 r 0 0 x"
t "0 4096 flakey $DISK1 0 1 1 1 corrupt_bio_byte"
t "0 4096 flakey $DISK1 0 1 1 5 corrupt_bio_byte 0 r 0 0"
t "0 4096 flakey $DISK1 0 1 1 5 corrupt_bio_byte x r 0 0"
t "0 4096 flakey $DISK1 0 1 1 5 corrupt_bio_byte 1 x 0 0"
t "0 4096 flakey $DISK1 0 1 1 5 corrupt_bio_byte 1 r 256 0"
t "0 4096 flakey $DISK1 0 1 1 5 corrupt_bio_byte 1 r 1 x"
t "0 4096 flakey $DISK1 0 1 1 8 corrupt_bio_byte 1 r 256 0"
t "0 4096 flakey $DISK1 0 1 1 5 drop_writes corrupt_bio_byte 1 w 0"
t "0 4096 flakey $DISK1 0 1 1 3 corrupt_bio_byte 1 r"
t "0 4096 flakey $DISK1 0 1 1 2 corrupt_bio_byte 1 r 0 0"
t "0 4096 flakey $DISK1 0 1 1 6 drop_writes corrupt_bio_byte 1 w 0 0"
t "0 4096 flakey $DISK1 0 1 1 6 error_writes corrupt_bio_byte 1 w 0 0"
t "0 4096 flakey $DISK1 0 1 1 6 corrupt_bio_byte 1 w 0 0 error_writes"
t "0 4096 flakey $DISK1 0 1 1 1 drop_writes bogus"
t "0 4096 flakey /dev/nonexist 0 1 1"
t "0 4096 flakey /dev/nonexist 0 1 1 1 bogus"
klog
echo "== up forever: I/O passes"
dmsetup create f --table "0 4096 flakey $DISK1 0 3600 0"
md5 "$(dev f)" 0 8
flush "$DISK1"
md5 "$DISK1" 0 8
fill 125 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
flush "$DISK1"
hexsec "$DISK1" 0
dmsetup remove f
echo "== down forever, no features: reads and writes fail"
dmsetup create f --table "0 4096 flakey $DISK1 8 0 5 0"
md5 "$(dev f)" 0 8
fill 126 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
flush "$DISK1"
hexsec "$DISK1" 8
dmsetup remove f
dmsetup create f --table "0 4096 flakey $DISK1 8 0 5"
md5 "$(dev f)" 0 8
dmsetup remove f
echo "== down, error_writes: reads pass, writes fail"
dmsetup create f --table "0 4096 flakey $DISK1 8 0 5 1 error_writes"
md5 "$(dev f)" 0 8
flush "$DISK1"
md5 "$DISK1" 8 8
fill 127 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
flush "$DISK1"
hexsec "$DISK1" 8
dmsetup remove f
echo "== down, drop_writes: reads pass, writes succeed and are dropped"
dmsetup create f --table "0 4096 flakey $DISK1 16 0 1 1 drop_writes"
fill 000 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
md5 "$(dev f)" 0 8
flush "$DISK1"
md5 "$DISK1" 16 8
flush "$DISK1"
hexsec "$DISK1" 16
dmsetup remove f
echo "== down, corrupt_bio_byte 1 w 7: byte 0 of the write becomes 07"
dmsetup create f --table "0 4096 flakey $DISK1 24 0 1 5 corrupt_bio_byte 1 w 7 0"
fill 000 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
flush "$DISK1"
hexsec "$DISK1" 24
flush "$DISK1"
hexsec "$DISK1" 25
flush "$DISK1"
md5 "$DISK1" 24 8
dmsetup remove f
echo "== down, corrupt_bio_byte 513 w 255: byte 512 of the write"
dmsetup create f --table "0 4096 flakey $DISK1 32 0 1 5 corrupt_bio_byte 513 w 255 0"
fill 000 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
flush "$DISK1"
hexsec "$DISK1" 32
flush "$DISK1"
hexsec "$DISK1" 33
dmsetup remove f
echo "== down, corrupt_bio_byte with a PREFLUSH flags mask: data writes untouched"
dmsetup create f --table "0 4096 flakey $DISK1 40 0 1 5 corrupt_bio_byte 1 w 9 262144"
fill 000 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
flush "$DISK1"
hexsec "$DISK1" 40
dmsetup remove f
echo "== down, corrupt_bio_byte 1 r 7: 6.1 never corrupts reads"
dmsetup create f --table "0 4096 flakey $DISK1 48 0 1 5 corrupt_bio_byte 1 r 7 0"
hexsec "$(dev f)" 0
flush "$DISK1"
hexsec "$DISK1" 48
fill 001 0 8 "$(dev f)" && echo "write ok" || echo "write failed"
flush "$DISK1"
hexsec "$DISK1" 48
dmsetup remove f
klog
