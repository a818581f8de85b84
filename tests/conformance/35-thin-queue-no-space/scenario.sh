# thin (dm-thin 6.1): a pool in queue_if_no_space mode (the default) runs out of data space:
# the write that needs a new block is held (mode out_of_data_space, the klog line), the pool's
# data device (a linear over DISK2) grows by a reload, the pool is reloaded and resumed
# ("growing the data device"), and the held write completes with its data.
dmsetup create data --table "0 2048 linear $DISK2 0"
dmsetup create pool --table "0 2048 thin-pool $DISK1 $(dev data) 128 0"
dmsetup message pool 0 "create_thin 0"
dmsetup create t --table "0 8192 thin $(dev pool) 0"
i=0
while [ $i -lt 16 ]; do
    fill 101 $((i * 128)) 128 $(dev t)
    i=$((i + 1))
done
dmsetup status pool
klog
echo "== out of data space, queued"
fill 102 2048 8 $(dev t) &
sleep 2
dmsetup status pool
dmsetup status t
klog
echo "== grow"
dmsetup suspend data
dmsetup reload data --table "0 4096 linear $DISK2 0"
dmsetup resume data
dmsetup suspend pool
dmsetup reload pool --table "0 4096 thin-pool $DISK1 $(dev data) 128 0"
dmsetup resume pool
wait
echo "== after"
dmsetup status pool
dmsetup status t
md5 $(dev t) 0 2056
klog
dmsetup remove t
dmsetup remove pool
dmsetup remove data
