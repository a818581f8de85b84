# thin-pool and thin (dm-thin 6.1): tables, statuses, messages and their errors, provisioning
# (whole and partial blocks), a snapshot and breaking sharing, a held metadata snapshot, and
# the metadata image itself, byte for byte (== images).  Each fill stays inside one 64 KiB
# block: one provisioning per fsync, so the kernel's commits fall at the same points each run.
echo "== pool"
dmsetup create pool --table "0 131072 thin-pool $DISK1 $DISK2 128 16"
dmsetup table pool
dmsetup status pool
dmsetup message pool 0 "create_thin 0"
dmsetup create t --table "0 65536 thin $(dev pool) 0"
dmsetup table t
dmsetup status t
echo "== provisioning"
fill 141 256 128 $(dev t)
fill 142 650 1 $(dev t)
md5 $(dev t) 0 1024
dmsetup status t
dmsetup status pool
echo "== snapshot"
dmsetup suspend t
dmsetup message pool 0 "create_snap 1 0"
dmsetup resume t
dmsetup create s --table "0 65536 thin $(dev pool) 1"
fill 143 264 8 $(dev t)
fill 144 1024 128 $(dev s)
md5 $(dev t) 0 1024
md5 $(dev s) 0 1024
dmsetup status t
dmsetup status s
dmsetup status pool
echo "== errors"
dmsetup message pool 0 "create_thin 0"
dmsetup message pool 0 "create_snap 5 9"
dmsetup message pool 0 "delete 7"
dmsetup message pool 0 "delete 0"
dmsetup message pool 0 "set_transaction_id 3 4"
dmsetup message pool 0 "create_thin x"
dmsetup message pool 0 "frob"
dmsetup create bad --table "0 8192 thin $(dev pool) 9"
dmsetup create bad2 --table "0 8192 thin-pool $DISK1 $DISK2 100 16"
klog
echo "== metadata snapshot"
dmsetup message pool 0 "set_transaction_id 0 1"
dmsetup message pool 0 "reserve_metadata_snap"
dmsetup status pool
dmsetup message pool 0 "reserve_metadata_snap"
dmsetup message pool 0 "release_metadata_snap"
dmsetup status pool
echo "== remove"
dmsetup remove s
dmsetup remove t
dmsetup message pool 0 "delete 1"
dmsetup status pool
dmsetup remove pool
klog
