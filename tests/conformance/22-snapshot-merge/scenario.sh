# snapshot-merge: writes through the origin and the snapshot, then the origin's table is
# replaced by snapshot-merge (exception handover from the suspended snapshot); the merge
# runs to completion and the origin then holds what the snapshot showed.
SZ=$(getsz "$DISK1")
fok() { fill "$@" && echo "write ok" || echo "write failed"; }
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 P 8"
dmsetup create origin --table "0 $SZ snapshot-origin $DISK1"
echo "== writes through the origin: 0+8, 1000+12, 4096+64"
fok 021 0 8 "$(dev origin)"
fok 022 1000 12 "$(dev origin)"
fok 023 4096 64 "$(dev origin)"
echo "== writes to the snapshot: 2048+8, 9+1, 5000+16, 16383+1"
fok 031 2048 8 "$(dev snap)"
fok 032 9 1 "$(dev snap)"
fok 033 5000 16 "$(dev snap)"
fok 034 16383 1 "$(dev snap)"
dmsetup status
snapmd5=$(md5 "$(dev snap)" 0 "$SZ")
originmd5=$(md5 "$(dev origin)" 0 "$SZ")
[ "$snapmd5" != "$originmd5" ] && echo "snapshot and origin differ"
echo "== hand the origin over to snapshot-merge"
dmsetup suspend snap
dmsetup load origin --table "0 $SZ snapshot-merge $DISK1 $DISK2 P 8"
dmsetup resume origin
dmsetup status snap
dmsetup remove snap
dmsetup table origin
klog
echo "== wait for the merge"
n=0
while :; do
    s=$(dmsetup status origin)
    used=$(echo "$s" | cut -d' ' -f4)
    meta=$(echo "$s" | cut -d' ' -f5)
    [ "${used%%/*}" = "$meta" ] && break
    n=$((n + 1))
    [ $n -ge 600 ] && { echo "merge did not finish: $s"; break; }
    sleep 0.1
done
dmsetup status origin
dmsetup table origin
[ "$(md5 "$(dev origin)" 0 "$SZ")" = "$snapmd5" ] && echo "origin now holds the snapshot's data"
hexsec "$(dev origin)" 8
hexsec "$(dev origin)" 9
hexsec "$(dev origin)" 1000
flush "$DISK1"
[ "$(md5 "$DISK1" 0 "$SZ")" = "$snapmd5" ] && echo "the origin image too"
flush "$DISK2"
hexsec "$DISK2" 0
hexsec "$DISK2" 8
echo "== writes after the merge go to the origin"
fok 041 64 8 "$(dev origin)"
dmsetup status origin
hexsec "$(dev origin)" 64
klog
echo "== back to snapshot-origin"
dmsetup load origin --table "0 $SZ snapshot-origin $DISK1"
dmsetup resume origin
dmsetup table origin
dmsetup remove origin
echo "== the merged COW reactivates empty"
dmsetup create snap --table "0 $SZ snapshot $DISK1 $DISK2 P 8"
dmsetup status snap
dmsetup remove snap
klog
