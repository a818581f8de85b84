# thin (dm-thin 6.1): a key below the lowest of a full root leaf.  252 mappings (one full leaf)
# for virtual blocks 1..252, then block 0: the root splits beneath, and block 0 must still be
# found (its data read back, the mapping counted), with the metadata image byte for byte.
dmsetup create pool --table "0 65536 thin-pool $DISK1 $DISK2 128 0"
dmsetup message pool 0 "create_thin 0"
dmsetup create t --table "0 65536 thin $(dev pool) 0"
i=1
while [ $i -le 252 ]; do
    fill 101 $((i * 128)) 1 $(dev t)
    i=$((i + 1))
done
dmsetup status t
fill 102 0 1 $(dev t)
dmsetup status t
dmsetup status pool
hexsec $(dev t) 0
hexsec $(dev t) 128
md5 $(dev t) 0 32768
dmsetup remove t
dmsetup create t --table "0 65536 thin $(dev pool) 0"
hexsec $(dev t) 0
dmsetup status t
dmsetup remove t
dmsetup remove pool
