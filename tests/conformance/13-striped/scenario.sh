# striped (dm-stripe 6.1): table and status strings, constructor errors in the kernel's
# order, where data lands on each stripe, a failed stripe in status, and the targets list.
t() {
    if dmsetup create s --table "$1"; then dmsetup table s; dmsetup status s; dmsetup remove s; else echo "create failed"; fi
}
echo "== tables"
t "0 8192 striped 2 128 $DISK1 0 $DISK2 0"
t "0 6144 striped 3 8 $DISK1 8 $DISK2 16 $DISK3 0"
t "0 3000 striped 3 1000 $DISK1 0 $DISK2 0 $DISK3 0"
t "0 4096 striped 1 4096 $DISK1 0"
t "0 4096 striped +2 0008 $DISK1 0 $DISK2 0"
t "0 4096 striped 2 8 $DISK1 18446744073709551616 $DISK2 1"
klog
echo "== constructor errors"
t "0 4096 striped"
t "0 4096 striped 2"
t "0 4096 striped 0 8 $DISK1 0"
t "0 4096 striped x 8 $DISK1 0"
t "0 4096 striped 2 0 $DISK1 0 $DISK2 0"
t "0 4096 striped 2 -8 $DISK1 0 $DISK2 0"
t "0 4095 striped 2 8 $DISK1 0 $DISK2 0"
t "0 4096 striped 2 3 $DISK1 0 $DISK2 0"
t "0 4096 striped 2 8 $DISK1 0"
t "0 4096 striped 2 8 $DISK1 0 $DISK2 0 extra"
t "0 4096 striped 2 8 $DISK1 x $DISK2 0"
t "0 4096 striped 2 8 $DISK1 0 /nonexistent 0"
t "0 4096 striped 4294967296 8 $DISK1 0"
klog
echo "== data"
dmsetup create s --table "0 6144 striped 3 8 $DISK1 8 $DISK2 16 $DISK3 0"
fill 101 0 8 "$(dev s)"
fill 102 8 8 "$(dev s)"
fill 103 16 8 "$(dev s)"
fill 104 24 12 "$(dev s)"
fill 105 6140 4 "$(dev s)"
md5 "$(dev s)" 0 6144
flush "$DISK1"; flush "$DISK2"; flush "$DISK3"
hexsec "$DISK1" 8
hexsec "$DISK1" 16
hexsec "$DISK2" 16
hexsec "$DISK3" 0
hexsec "$DISK3" 8
hexsec "$DISK1" 2055
hexsec "$DISK3" 2047
dmsetup message s 0 hello
klog
dmsetup remove s
echo "== a failed stripe"
dmsetup create e --table "0 2048 error"
dmsetup create s --table "0 4096 striped 2 8 $DISK1 0 $(dev e) 0"
dmsetup status s
md5 "$(dev s)" 0 8
md5 "$(dev s)" 8 8 || echo "read failed"
dmsetup status s
md5 "$(dev s)" 24 8 || echo "read failed"
dmsetup status s
dmsetup remove s
dmsetup remove e
klog
echo "== targets"
dmsetup targets
