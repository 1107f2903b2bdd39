module moor/peers/go

go 1.19
