# snapshot and snapshot-origin constructor errors, with their log lines; accepted
# spellings; a COW header that is corrupt, of another version or marked invalid.
SZ=$(getsz "$DISK1")
t() {
    if dmsetup create g --table "$1"; then dmsetup table g; dmsetup status g; dmsetup remove g; else echo "create failed"; fi
    klog
}
O=$DISK1
C=$DISK2
echo "== argument count and features"
t "0 $SZ snapshot $O $C P"
t "0 $SZ snapshot $O $C"
t "0 $SZ snapshot"
t "0 $SZ snapshot $O $C P 8 1 foo"
t "0 $SZ snapshot $O $C P 8 3 a b c"
t "0 $SZ snapshot $O $C P 8 x"
t "0 $SZ snapshot $O $C P 8 1 discard_passdown_origin"
t "0 $SZ snapshot $O $C P 8 2 discard_zeroes_cow discard_passdown_origin"
t "0 $SZ snapshot $O $C P 8 1 discard_zeroes_cow extra"
echo "== devices"
t "0 $SZ snapshot /dev/nonexist $C P 8"
t "0 $SZ snapshot $O /dev/nonexist P 8"
t "0 $SZ snapshot $O $O P 8"
echo "== store letter"
t "0 $SZ snapshot $O $C X 8"
t "0 $SZ snapshot $O $C PX 8"
t "0 $SZ snapshot $O $C p 8"
t "0 $SZ snapshot $O $C Po 8"
t "0 $SZ snapshot $O $C N 0"
echo "== chunk size"
t "0 $SZ snapshot $O $C P 12"
t "0 $SZ snapshot $O $C P abc"
t "0 $SZ snapshot $O $C P -8"
t "0 $SZ snapshot $O $C P 4194304"
t "0 $SZ snapshot $O $C N 12"
t "0 $SZ snapshot $O $C N 4194304"
echo "== COW too small for the chunk size"
t "0 $SZ snapshot $O $DISK3 P 2048"
t "0 $SZ snapshot $O $DISK3 P 4096"
t "0 $SZ snapshot $O $DISK3 N 4096"
flush "$DISK3"
hexsec "$DISK3" 0
echo "== chunk size 1 and 0"
fill 000 0 2048 "$C"
t "0 $SZ snapshot $O $C P 1"
fill 000 0 2048 "$C"
t "0 $SZ snapshot $O $C P 0"
flush "$C"
hexsec "$C" 0
echo "== COW header: bad magic, version 2, marked invalid"
fill 000 0 2048 "$C"
fill 357 0 1 "$C"
t "0 $SZ snapshot $O $C P 8"
printf 'SnAp\001\000\000\000\002\000\000\000\010\000\000\000' | dd of="$C" conv=notrunc 2>/dev/null
t "0 $SZ snapshot $O $C P 8"
printf 'SnAp\000\000\000\000\001\000\000\000\010\000\000\000' | dd of="$C" conv=notrunc 2>/dev/null
t "0 $SZ snapshot $O $C P 8"
dmsetup create g --table "0 $SZ snapshot $O $C P 8"
md5 "$(dev g)" 0 8
dmsetup remove g
klog
echo "== snapshot-origin"
t "0 $SZ snapshot-origin $O extra"
t "0 $SZ snapshot-origin"
t "0 $SZ snapshot-origin /dev/nonexist"
t "0 $SZ snapshot-origin $O"
