# thin (dm-thin 6.1), heavier: 300 blocks provisioned one fsync'd fill at a time (a leaf splits
# past 252 mappings), snapshots of snapshots (blocks and nodes counted 3 and more), sharing
# broken at different depths, a snapshot deleted from the middle, then the pool filled until
# it runs out of data space in error mode (low water event, mode change, failed writes); the
# metadata image byte for byte.
dmsetup create pool --table "0 40960 thin-pool $DISK1 $DISK2 128 8 1 error_if_no_space"
dmsetup message pool 0 "create_thin 0"
dmsetup create t --table "0 131072 thin $(dev pool) 0"
i=0
while [ $i -lt 300 ]; do
    fill 101 $((i * 128)) 128 $(dev t)
    i=$((i + 1))
done
dmsetup status t
dmsetup status pool
echo "== snapshots"
dmsetup suspend t
dmsetup message pool 0 "create_snap 1 0"
dmsetup message pool 0 "create_snap 2 1"
dmsetup message pool 0 "create_snap 3 2"
dmsetup resume t
dmsetup create s2 --table "0 131072 thin $(dev pool) 2"
fill 102 8 8 $(dev t)
fill 103 12800 128 $(dev s2)
fill 104 25600 16 $(dev s2)
md5 $(dev t) 0 40960
md5 $(dev s2) 0 40960
dmsetup status t
dmsetup status s2
dmsetup status pool
echo "== delete"
dmsetup message pool 0 "delete 1"
dmsetup status pool
echo "== out of data space"
i=300
while [ $i -lt 320 ]; do
    fill 105 $((i * 128)) 1 $(dev t)
    i=$((i + 1))
done
dmsetup status t
dmsetup status pool
md5 $(dev t) 38400 2560
klog
dmsetup remove s2
dmsetup remove t
dmsetup remove pool
