# A thin pool's metadata device filled (dm-thin 6.1): 128 metadata blocks (a linear device
# over part of DISK1), each snapshot of thin 1 then a write to its shared block 0 costs one
# more btree leaf.  The low-water event for metadata (raw free blocks <= min(1024, total/4)),
# then out-of-metadata-space: read-only ("ro"), the write that needed the space fails,
# messages refused.  A suspend/resume alone changes nothing; the metadata device grown and
# the pool reloaded goes back to write mode, with every committed mapping kept.
st() { dmsetup status pool; klog; }
ev() { echo "events $(dmsetup info -c --noheadings -o events pool)"; }
dmsetup create meta --table "0 1024 linear $DISK1 0"
dmsetup create pool --table "0 32768 thin-pool $(dev meta) $DISK2 128 0"
dmsetup message pool 0 "create_thin 1"
dmsetup create thin --table "0 8192 thin $(dev pool) 1"
fill 101 0 1 $(dev thin) || echo "write failed"
st; ev
i=2
while [ $i -le 200 ]; do
    dmsetup message pool 0 "create_snap $i 1" || { echo "snapshot $i refused"; break; }
    fill 102 $i 1 $(dev thin) || { echo "write $i failed"; break; }
    echo "== $i"; st
    i=$((i + 1))
done
echo "== full"
st; ev
dmsetup table pool
dmsetup status thin
echo "== suspend and resume alone"
dmsetup suspend pool
dmsetup resume pool
st; ev
dmsetup message pool 0 "create_thin 1000" || echo "message refused"
klog
echo "== metadata grown, pool reloaded"
dmsetup reload meta --table "0 2048 linear $DISK1 0"
dmsetup resume meta
dmsetup reload pool --table "0 32768 thin-pool $(dev meta) $DISK2 128 0"
dmsetup resume pool
st; ev
fill 103 150 1 $(dev thin) || echo "write failed"
dmsetup message pool 0 "create_snap 1000 1" || echo "message refused"
st; ev
dmsetup status thin
echo "== data kept"
dmsetup remove thin
for d in 1 2 3 50 1000; do
    dmsetup create t$d --table "0 8192 thin $(dev pool) $d" || continue
    echo "thin $d $(md5 $(dev t$d) 0 256) $(dmsetup status t$d)"
    dmsetup remove t$d
done
st
dmsetup remove pool
dmsetup remove meta
klog
