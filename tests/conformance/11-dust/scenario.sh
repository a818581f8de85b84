# dust: constructor errors, every message with its reply and log lines, bad-block I/O.
t() {
    if dmsetup create g --table "$1"; then dmsetup table g; dmsetup remove g; else echo "create failed"; fi
}
m() { dmsetup message "$@"; echo "rc=$?"; }
echo "== table and status"
dmsetup create du --table "0 8192 dust $DISK1 0 4096"
dmsetup table du
dmsetup status du
dmsetup deps du
echo "== fresh"
m du 0 countbadblocks
m du 0 listbadblocks
m du 0 queryblock 5
m du 0 clearbadblocks
klog
echo "== add"
m du 0 addbadblock 5
m du 0 addbadblock 60
m du 0 addbadblock 7 3
m du 0 addbadblock 5
klog
m du 0 countbadblocks
m du 0 listbadblocks
m du 0 queryblock 5
m du 0 QueryBlock 60
m du 0 removebadblock 6
m du 0 removebadblock 60
klog
echo "== enable: reads of listed blocks fail"
m du 8191 enable
dmsetup status du
md5 "$(dev du)" 40 8
md5 "$(dev du)" 32 8
flush "$DISK1"
md5 "$DISK1" 32 8
klog
echo "== writes in fail mode"
# An odd-sized device gets 512-byte buffers in the kernel's page cache, so a one-sector
# fill is one 512-byte write with no read of the rest of the page first.
dmsetup create dw --table "0 8191 dust $DISK1 0 4096"
m dw 0 addbadblock 7 2
m dw 0 addbadblock 5
m dw 0 enable
fill 101 56 1 "$(dev dw)" && echo "write ok" || echo "write failed"
m dw 0 listbadblocks
fill 101 57 1 "$(dev dw)" && echo "write ok" || echo "write failed"
m dw 0 listbadblocks
fill 101 58 1 "$(dev dw)" && echo "write ok" || echo "write failed"
m dw 0 listbadblocks
fill 102 40 1 "$(dev dw)" && echo "write ok" || echo "write failed"
m dw 0 listbadblocks
md5 "$(dev dw)" 40 8
md5 "$(dev dw)" 56 8
flush "$DISK1"
hexsec "$DISK1" 56
hexsec "$DISK1" 57
hexsec "$DISK1" 58
hexsec "$DISK1" 40
m dw 0 disable
dmsetup remove dw
klog
echo "== quiet"
m du 0 quiet
dmsetup status du
m du 0 addbadblock 9
m du 0 addbadblock 9
m du 0 removebadblock 10
m du 0 removebadblock 9
m du 0 quiet
dmsetup status du
m du 0 disable
dmsetup status du
md5 "$(dev du)" 40 8
klog
echo "== clear"
m du 0 clearbadblocks
m du 0 clearbadblocks
m du 0 countbadblocks
echo "== message errors"
m du 0 addbadblock
m du 0 removebadblock
m du 0 QUERYBLOCK
m du 0 addbadblock x
m du 0 addbadblock -1
m du 0 addbadblock 4097
m du 0 addbadblock 4096
m du 0 addbadblock 1 256
m du 0 addbadblock 1 x
m du 0 addbadblock 99999 256
m du 0 addbadblock 99999 255
m du 0 foo
m du 0 foo 1
m du 0 foo x
m du 0 foo 1 2
m du 0 queryblock 1 2
m du 0 a b c d
m du 0 ADDBADBLOCK 3
m du 0 listbadblocks
m du 8192 countbadblocks
klog
dmsetup remove du
echo "== block numbers count from the underlying device start"
dmsetup create du9 --table "0 8192 dust $DISK1 8 4096"
dmsetup table du9
m du9 0 addbadblock 1
m du9 0 enable
md5 "$(dev du9)" 0 8
md5 "$(dev du9)" 8 8
flush "$DISK1"
md5 "$DISK1" 16 8
dmsetup remove du9
klog
echo "== requests split at block boundaries; 512-byte blocks"
dmsetup create du5 --table "0 64 dust $DISK1 0 512"
m du5 0 addbadblock 3
m du5 0 enable
md5 "$(dev du5)" 0 8
md5 "$(dev du5)" 8 8
flush "$DISK1"
md5 "$DISK1" 8 8
m du5 0 addbadblock 32768
m du5 0 addbadblock 32769
dmsetup remove du5
klog
echo "== constructor errors"
t "0 8192 dust $DISK1 0 1000"
t "0 8192 dust $DISK1 0 256"
t "0 8192 dust $DISK1 0"
t "0 8192 dust $DISK1 0 4096 x"
t "0 8192 dust $DISK1 0 0"
t "0 8192 dust $DISK1 0 abc"
t "0 8192 dust $DISK1 0 -512"
t "0 8192 dust $DISK1 0 +512"
t "0 8192 dust $DISK1 0 4294967296"
t "0 8 dust $DISK1 0 8192"
t "0 8 dust $DISK1 0 4096"
t "0 8192 dust $DISK1 x 4096"
t "0 8192 dust $DISK1 x 1000"
t "0 8192 dust /dev/nonexist 0 4096"
klog
