# A 1 MiB COW with 8-sector chunks holds 254 exceptions (header + area 0 + 254 data
# chunks).  Filled through the origin, then through the snapshot (P: Invalid), then with
# PO (a snapshot write that finds no chunk: Overflow; an origin write later: Invalid).
SZ=$(getsz "$DISK1")
ev() { dmsetup info -c --noheadings -o events snap; }
fok() { fill "$@" && echo "write ok" || echo "write failed"; }
echo "origin $SZ sectors, cow $(getsz "$DISK2") sectors"
orig=$(md5 "$DISK1" 0 "$SZ")
echo "== P 8, filled through the origin"
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 P 8"
dmsetup create origin --table "0 $SZ snapshot-origin $DISK1"
dmsetup status snap
ev
fok 021 0 2032 "$(dev origin)"
dmsetup status snap
[ "$(md5 "$(dev snap)" 0 "$SZ")" = "$orig" ] && echo "snapshot still reads the old data"
echo "== one more chunk through the origin"
fok 042 4096 8 "$(dev origin)"
dmsetup status snap
dmsetup table snap
ev
md5 "$(dev snap)" 0 8
hexsec "$(dev origin)" 4096
fok 043 4104 8 "$(dev origin)"
hexsec "$(dev origin)" 4104
fok 044 0 8 "$(dev snap)"
flush "$DISK2"
hexsec "$DISK2" 0
klog
echo "== reload: the header says invalid"
dmsetup remove snap
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 P 8"
dmsetup status snap
md5 "$(dev snap)" 0 8
dmsetup remove snap
klog
echo "== P 8 on a fresh COW, filled through the snapshot"
fill 000 0 2048 "$DISK2"
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 P 8"
dmsetup status snap
fok 061 0 2032 "$(dev snap)"
dmsetup status snap
hexsec "$(dev snap)" 2024
fok 062 4096 8 "$(dev snap)"
dmsetup status snap
ev
md5 "$(dev snap)" 0 8
flush "$DISK2"
hexsec "$DISK2" 0
fok 063 4112 8 "$(dev origin)"
hexsec "$(dev origin)" 4112
dmsetup remove snap
klog
echo "== PO 8 on a fresh COW, filled through the snapshot"
fill 000 0 2048 "$DISK2"
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 PO 8"
dmsetup table snap
fok 071 0 2032 "$(dev snap)"
dmsetup status snap
fok 072 4096 8 "$(dev snap)"
dmsetup status snap
ev
hexsec "$(dev snap)" 8
hexsec "$(dev snap)" 4096
fok 073 8 8 "$(dev snap)"
hexsec "$(dev snap)" 8
flush "$DISK2"
hexsec "$DISK2" 0
klog
echo "== PO: an origin write needing a chunk invalidates"
fok 074 0 8 "$(dev origin)"
dmsetup status snap
fok 075 4120 8 "$(dev origin)"
dmsetup status snap
ev
md5 "$(dev snap)" 0 8
hexsec "$(dev origin)" 4120
flush "$DISK2"
hexsec "$DISK2" 0
klog
dmsetup remove origin
dmsetup remove snap
