# delay: tables, constructor errors, held-request counts and presuspend releasing them.
t() {
    if dmsetup create g --table "$1"; then dmsetup table g; dmsetup status g; dmsetup deps g; dmsetup remove g; else echo "create failed"; fi
}
echo "== tables"
t "0 4096 delay $DISK1 0 100"
t "0 4096 delay $DISK1 0 100 $DISK2 8 200"
t "0 4096 delay $DISK1 0 100 $DISK2 8 200 $DISK1 16 0"
t "0 4096 delay $DISK2 0 0 $DISK1 8 0 $DISK2 16 0"
dmsetup create g --table "0 4096 delay $DISK1 0 100"
dmsetup message g 0 hello
dmsetup remove g
echo "== constructor errors"
t "0 4096 delay $DISK1 0"
t "0 4096 delay $DISK1 0 1 $DISK2"
t "0 4096 delay $DISK1 0 1 $DISK2 0 1 $DISK1 0 1 x"
t "0 4096 delay $DISK1 x 1"
t "0 4096 delay $DISK1 0 x"
t "0 4096 delay $DISK1 0 -5"
t "0 4096 delay $DISK1 0 1 $DISK2 0 y"
t "0 4096 delay $DISK1 0 1 $DISK2 z 1"
t "0 4096 delay $DISK1 0 1 $DISK2 0 1 $DISK1 0 q"
t "0 4096 delay /dev/nonexist 0 1"
t "0 4096 delay $DISK1 0 1 /dev/nonexist 0 1"
t "0 4096 delay /dev/nonexist x 1"
klog
echo "== delay 0 passes at once"
dmsetup create z --table "0 4096 delay $DISK1 0 0"
md5 "$(dev z)" 0 8
md5 "$DISK1" 0 8
dmsetup status z
dmsetup remove z
echo "== a held read is released by suspend"
dmsetup create dd --table "0 4096 delay $DISK1 0 20000"
( echo "read: $(md5 "$(dev dd)" 0 8)" ) &
sleep 3
dmsetup status dd
dmsetup suspend dd
wait
echo "read finished while suspended"
dmsetup status dd
dmsetup info -c --noheadings -o name,attr dd
dmsetup resume dd
dmsetup remove dd
echo "== noflush suspend releases too; a read issued while suspended waits for resume"
dmsetup create dn --table "0 4096 delay $DISK1 0 5000"
( echo "read 1: $(md5 "$(dev dn)" 8 8)" ) &
sleep 2
dmsetup status dn
dmsetup suspend --noflush dn
wait
( echo "read 2: $(md5 "$(dev dn)" 16 8)" ) &
sleep 2
echo "resuming"
dmsetup status dn
dmsetup resume dn
sleep 2
dmsetup status dn
wait
dmsetup status dn
dmsetup remove dn
echo "== held writes go to the write device; flushes to the flush device"
dmsetup create dw --table "0 4096 delay $DISK1 0 0 $DISK2 8 20000"
( fill 141 0 8 "$(dev dw)" && echo "write ok" || echo "write failed" ) &
sleep 3
dmsetup status dw
dmsetup suspend dw
wait
dmsetup status dw
dmsetup resume dw
hexsec "$DISK2" 8
hexsec "$DISK1" 0
dmsetup remove dw
dmsetup create df --table "0 4096 delay $DISK1 0 0 $DISK1 0 0 $DISK2 0 20000"
( fill 142 16 8 "$(dev df)" && echo "write ok" || echo "write failed" ) &
sleep 3
dmsetup status df
dmsetup suspend df
wait
dmsetup status df
dmsetup resume df
hexsec "$DISK1" 16
dmsetup remove df
klog
