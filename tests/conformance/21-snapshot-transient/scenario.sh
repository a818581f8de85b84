# Transient (N) store: chunks from 0 upward with no header, status <used>/<total> 0;
# removal loses every exception; a full store invalidates (no Overflow mode).
SZ=$(getsz "$DISK1")
fok() { fill "$@" && echo "write ok" || echo "write failed"; }
orig=$(md5 "$DISK1" 0 "$SZ")
orig0=$(md5 "$DISK1" 0 8)
echo "== create"
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 N 8"
dmsetup create origin --table "0 $SZ snapshot-origin $DISK1"
dmsetup status snap
dmsetup table snap
flush "$DISK2"
hexsec "$DISK2" 0
echo "== writes through the origin: 0+8, 1000+12"
fok 021 0 8 "$(dev origin)"
dmsetup status snap
fok 022 1000 12 "$(dev origin)"
dmsetup status snap
[ "$(md5 "$(dev snap)" 0 "$SZ")" = "$orig" ] && echo "snapshot still reads the old data"
hexsec "$(dev origin)" 1000
hexsec "$(dev snap)" 1000
flush "$DISK2"
[ "$(md5 "$DISK2" 0 8)" = "$orig0" ] && echo "COW chunk 0 holds the old origin chunk 0"
echo "== writes to the snapshot: 2048+8, 9+1"
fok 023 2048 8 "$(dev snap)"
fok 024 9 1 "$(dev snap)"
dmsetup status snap
hexsec "$(dev snap)" 2048
hexsec "$(dev snap)" 9
hexsec "$(dev snap)" 8
[ "$(md5 "$(dev origin)" 2048 8)" = "$(md5 "$DISK1" 2048 8)" ] && echo "origin sector 2048 unchanged"
hexsec "$(dev origin)" 8
dmsetup status
dmsetup table
echo "== removal and re-creation lose the exceptions"
cur=$(md5 "$DISK1" 0 "$SZ")
dmsetup remove origin
dmsetup remove snap
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 N 8"
dmsetup status snap
[ "$(md5 "$(dev snap)" 0 "$SZ")" = "$cur" ] && echo "snapshot reads the current origin"
echo "== filled through the snapshot: 256 chunks fit, the 257th invalidates"
fok 031 0 2048 "$(dev snap)"
dmsetup status snap
fok 032 4096 8 "$(dev snap)"
dmsetup status snap
dmsetup table snap
md5 "$(dev snap)" 0 8
dmsetup remove snap
klog
echo "== store letters"
for st in n NO Nfoo; do
    dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 $st 16" && dmsetup table snap && dmsetup status snap
    dmsetup remove snap
done
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 N 0" || echo "create failed"
klog
