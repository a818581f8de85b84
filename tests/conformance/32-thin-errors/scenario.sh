# thin-pool and thin constructor errors (dm-thin 6.1), in the kernel's order, with their log
# lines; a foreign metadata device refused, written nothing (== images); the data block size
# of a formatted pool kept.
t() {
    if dmsetup create x --table "$1"; then dmsetup table x; dmsetup status x; dmsetup remove x; else echo "create failed"; fi
    klog
}
echo "== thin-pool"
t "0 32768 thin-pool $DISK1 $DISK2"
t "0 32768 thin-pool $DISK1 $DISK2 128"
t "0 32768 thin-pool $DISK1 $DISK1 128 0"
t "0 32768 thin-pool $DISK1 $DISK2 127 0"
t "0 32768 thin-pool $DISK1 $DISK2 64 0"
t "0 32768 thin-pool $DISK1 $DISK2 192 0"
t "0 32768 thin-pool $DISK1 $DISK2 4194304 0"
t "0 32768 thin-pool $DISK1 $DISK2 +128 0"
t "0 32768 thin-pool $DISK1 $DISK2 128 -1"
t "0 32768 thin-pool $DISK1 $DISK2 128 x"
t "0 32768 thin-pool $DISK1 $DISK2 128 0 1"
t "0 32768 thin-pool $DISK1 $DISK2 128 0 5 a b c d e"
t "0 32768 thin-pool $DISK1 $DISK2 128 0 1 frobnicate"
t "0 32768 thin-pool $DISK1 $DISK2 128 0 2 read_only SKIP_BLOCK_ZEROING"
t "0 32768 thin-pool $DISK3 $DISK2 128 0"
echo "== thin"
dmsetup create pool --table "0 32768 thin-pool $DISK1 $DISK2 128 0"
dmsetup message pool 0 "create_thin 1"
dmsetup create lin --table "0 8192 linear $DISK2 0"
t "0 8192 thin $(dev pool)"
t "0 8192 thin $(dev pool) 1 $(dev lin) extra"
t "0 8192 thin $(dev pool) x"
t "0 8192 thin $(dev pool) 16777216"
t "0 8192 thin $(dev pool) 2"
t "0 8192 thin $(dev lin) 1"
t "0 8192 thin $(dev pool) 1 $(dev pool)"
t "0 8192 thin $(dev pool) 1"
t "0 8192 thin $(dev pool) 1 $(dev lin)"
dmsetup remove lin
dmsetup remove pool
echo "== block size kept"
t "0 32768 thin-pool $DISK1 $DISK2 128 0"
t "0 32768 thin-pool $DISK1 $DISK2 256 4"
