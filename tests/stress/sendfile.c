/* Copies a file to stdout with sendfile(2) alone, as web servers serve
 * static files, and says so when the kernel reports end of file early.
 * Built static, so it runs in any container. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: sendfile FILE\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        printf("OPEN FAILED %s\n", argv[1]);
        return 2;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        printf("FSTAT FAILED\n");
        return 2;
    }
    off_t done = 0;
    while (done < st.st_size) {
        ssize_t n = sendfile(1, fd, NULL, (size_t)(st.st_size - done));
        if (n < 0) {
            printf("SENDFILE FAILED\n");
            return 3;
        }
        if (n == 0) {
            printf("SHORT %lld of %lld\n", (long long)done, (long long)st.st_size);
            return 4;
        }
        done += n;
    }
    return 0;
}
