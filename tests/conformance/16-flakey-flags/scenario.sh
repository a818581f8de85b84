# flakey's corrupt_bio_byte flags mask against the request flags 6.1's block device gives
# writes: a buffered write written back at close or fsync is REQ_SYNC (0x800), an O_DIRECT
# write REQ_SYNC|REQ_IDLE (0x8800); none carries REQ_FUA, REQ_PREFLUSH or REQ_BACKGROUND.
# The device is down for ever, so every write whose flags hold the whole mask has its
# first byte set to 0x55; the byte read back from the disk shows which did.
s=0
try() {  # MASK METHOD
    dmsetup create f --table "0 8192 flakey $DISK1 0 0 1 5 corrupt_bio_byte 1 w 85 $1"
    case "$2" in
    close)  head -c 4096 /dev/zero | tr '\000' '\252' |
            dd of="$(dev f)" bs=4096 seek=$((s / 8)) iflag=fullblock conv=notrunc 2>/dev/null ;;
    fsync)  head -c 4096 /dev/zero | tr '\000' '\252' |
            dd of="$(dev f)" bs=4096 seek=$((s / 8)) iflag=fullblock conv=notrunc,fsync 2>/dev/null ;;
    direct) head -c 4096 /dev/zero | tr '\000' '\252' |
            dd of="$(dev f)" bs=4096 seek=$((s / 8)) iflag=fullblock oflag=direct conv=notrunc 2>/dev/null ;;
    direct-fsync) head -c 4096 /dev/zero | tr '\000' '\252' |
            dd of="$(dev f)" bs=4096 seek=$((s / 8)) iflag=fullblock oflag=direct conv=notrunc,fsync 2>/dev/null ;;
    esac
    echo "mask $1 $2: $?"
    dmsetup remove f
    flush "$DISK1"
    hexsec "$DISK1" "$s"
    s=$((s + 8))
}
echo "== a table with a flags mask"
dmsetup create f --table "0 8192 flakey $DISK1 0 0 1 5 corrupt_bio_byte 1 w 85 34816"
dmsetup table f
dmsetup remove f
for mask in 0 1 2048 32768 34816 131072 262144 1048576 4294967295; do
    echo "== mask $mask"
    for method in close fsync direct direct-fsync; do
        try "$mask" "$method"
    done
done
klog
